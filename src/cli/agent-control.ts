/** The flag and the argument of the commands that ask a running agent (agent status, warm, mark-booted, cache, evict). */
import { Args, Flags } from '@oclif/core';
import { DEFAULT_CONTROL } from '../agent/config.js';

export const controlFlag = () => Flags.string({ description: "The agent's control socket.", helpValue: 'PATH', default: DEFAULT_CONTROL });

export const exportArg = () => Args.string({ description: 'Export name (the image path relative to the storage root).', required: true });
