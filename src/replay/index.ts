export { collectReads, parseTraceText, readTraceFile, type BootTrace, type TraceRead } from './trace.js';
export {
  buildPlan,
  simulatePlan,
  DEFAULT_ASSUMED_SERVICE_US,
  type PlanOptions,
  type PlannedRead,
  type ReplayModelKind,
  type ReplayPlan,
  type SimulatedRead,
} from './plan.js';
export { largestRead, replayPlan, runSchedule, realClock, type Clock, type ReplayedRead, type ScheduleOptions, type ScheduleResult } from './scheduler.js';
export { buildStats, percentile, summarizeLatencies, type LatencySummary, type PhaseReport, type ReplayStats } from './report.js';
export { ReplaySession, TraceBeyondExportError, replayTraceFile, type ReplayOptions, type ReplayResult } from './replay.js';
