export { compilePolicy } from './compile.js';
export { PolicyError } from './errors.js';
export { parsePolicy } from './parse.js';
export { TcpPaths } from './paths.js';
export { runPolicyTests } from './tests.js';
export type {
  CompiledPolicy,
  FilterRuleSpec,
  PeerGroup,
  Policy,
  PolicyNode,
  PolicyTestOutcome,
} from './types.js';
