// Failed authentication, throttled per source address: admin API keys (gRPC
// and REST), agent call signatures, the metrics token and the coordinators'
// shared secret. Only failures spend the budget, so a
// caller that authenticates is never slowed; an address that spent it is
// refused before any key or signature is checked until the budget refills.
import type { Logger } from 'pino';
import { CoordinatorError } from '../state/errors.js';
import type { Metrics } from './metrics.js';
import { RateLimiter } from './ratelimit.js';

export type Api = 'admin' | 'rest' | 'control' | 'replica';

export interface ThrottleOptions {
  /** Failures an address may have in a row before it is held. */
  burst: number;
  /** Failures per second an address regains. */
  perSecond: number;
}

export class AuthThrottle {
  private readonly budget: RateLimiter;

  constructor(
    opts: ThrottleOptions,
    private readonly log: Logger,
    private readonly metrics: Metrics,
    now: () => number = () => performance.now(),
  ) {
    this.budget = new RateLimiter(opts.perSecond, opts.burst, now);
  }

  /** Throws when `peer` failed too often; call it before checking credentials. */
  check(api: Api, peer: string, method: string): void {
    if (this.budget.available(peer)) return;
    this.metrics.authThrottled.inc({ api });
    const err = new CoordinatorError(
      'exhausted',
      'too many failed authentications from this address; wait and retry',
    );
    refusal(this.log, api, peer, method, err.message);
    throw err;
  }

  /** Records a failed authentication of `peer` and logs it. */
  failed(api: Api, peer: string, method: string, reason: string): void {
    this.budget.take(peer);
    this.metrics.authFailures.inc({ api });
    refusal(this.log, api, peer, method, reason);
  }
}

/** The one log line of every refused call: fail2ban matches `peer` (an address without port). */
export function refusal(log: Logger, api: Api, peer: string, method: string, reason: string): void {
  log.warn({ api, peer, method, reason }, 'refused call');
}
