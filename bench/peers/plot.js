// Plots of the peers benchmark, rendered to SVG with Vega-Lite (headless, no
// canvas needed): boot time per configuration, and storage reads over time
// during a boot.
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const vega = require('vega');
const vegaLite = require('vega-lite');

async function render(spec) {
  const compiled = vegaLite.compile(spec).spec;
  const view = new vega.View(vega.parse(compiled), { renderer: 'none' });
  const svg = await view.toSVG();
  view.finalize();
  return svg;
}

const palette = {
  domain: ['local image', 'direct remote', 'nbdkit cache+readahead', 'qcow2 copy-on-read', 'bootcache'],
  range: ['#4d4d4d', '#d62728', '#ff7f0e', '#9467bd', '#1f77b4'],
};

/**
 * Bars of median boot time per configuration and phase, one panel per delay,
 * with whiskers from the fastest to the slowest run.
 * rows: { delay: 'D = 10 ms', label, family, median, min, max }
 */
export function bootTimePlot(rows, { title, unit = 's' }) {
  return render({
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title,
    data: { values: rows },
    facet: { row: { field: 'delay', type: 'nominal', title: null, header: { labelFontSize: 13, labelFontWeight: 'bold' } } },
    spec: {
      width: 560,
      layer: [
        {
          mark: { type: 'bar', height: 14 },
          encoding: {
            y: { field: 'label', type: 'nominal', sort: null, title: null, axis: { labelLimit: 260 } },
            x: { field: 'median', type: 'quantitative', title: `median (${unit}); whiskers: fastest to slowest run` },
            color: { field: 'family', type: 'nominal', scale: palette, legend: null },
          },
        },
        {
          mark: { type: 'rule', color: 'black' },
          encoding: { y: { field: 'label', type: 'nominal', sort: null }, x: { field: 'min', type: 'quantitative' }, x2: { field: 'max' } },
        },
        {
          mark: { type: 'text', align: 'left', dx: 4, fontSize: 11 },
          encoding: {
            y: { field: 'label', type: 'nominal', sort: null },
            x: { field: 'max', type: 'quantitative' },
            text: { field: 'median', type: 'quantitative', format: '.1f' },
          },
        },
      ],
    },
    resolve: { scale: { y: 'independent' } },
  });
}

/**
 * Cumulative storage MiB (and requests) against seconds since the boot's
 * start, one line per configuration and phase.
 * points: { label, family, t, mib, requests }
 */
export function storageOverTimePlot(points, { title }) {
  return render({
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title,
    data: { values: points },
    hconcat: [
      {
        width: 420,
        height: 300,
        mark: { type: 'line', interpolate: 'step-after' },
        encoding: {
          x: { field: 't', type: 'quantitative', title: 'seconds since QEMU start' },
          y: { field: 'mib', type: 'quantitative', title: 'storage MiB read (cumulative)' },
          color: { field: 'label', type: 'nominal', title: 'configuration', sort: null, legend: { orient: 'bottom', columns: 3, labelLimit: 320 } },
        },
      },
      {
        width: 420,
        height: 300,
        mark: { type: 'line', interpolate: 'step-after' },
        encoding: {
          x: { field: 't', type: 'quantitative', title: 'seconds since QEMU start' },
          y: { field: 'requests', type: 'quantitative', title: 'storage read requests (cumulative)' },
          color: { field: 'label', type: 'nominal', sort: null },
        },
      },
    ],
  });
}

/** Per-boot completion against N, one line per server, plus storage MiB. rows: { server, n, median, max, storageMiB } */
export function stormPlot(rows, { title }) {
  return render({
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title,
    data: { values: rows },
    hconcat: [
      {
        width: 360,
        height: 260,
        layer: [
          {
            mark: { type: 'line', point: true },
            encoding: {
              x: { field: 'n', type: 'quantitative', title: 'simultaneous boots (N)', scale: { type: 'log', base: 2 } },
              y: { field: 'median', type: 'quantitative', title: 'completion per boot, s (median; band to slowest)' },
              color: { field: 'server', type: 'nominal', title: null, legend: { orient: 'bottom', labelLimit: 320 } },
            },
          },
          {
            mark: { type: 'area', opacity: 0.15 },
            encoding: {
              x: { field: 'n', type: 'quantitative', scale: { type: 'log', base: 2 } },
              y: { field: 'median', type: 'quantitative' },
              y2: { field: 'max' },
              color: { field: 'server', type: 'nominal' },
            },
          },
        ],
      },
      {
        width: 360,
        height: 260,
        mark: { type: 'line', point: true },
        encoding: {
          x: { field: 'n', type: 'quantitative', title: 'simultaneous boots (N)', scale: { type: 'log', base: 2 } },
          y: { field: 'storageMiB', type: 'quantitative', title: 'storage MiB read, whole storm', scale: { type: 'log' } },
          color: { field: 'server', type: 'nominal', title: null },
        },
      },
    ],
  });
}
