// The HTTP listener: liveness, readiness, Prometheus metrics and a REST
// mirror of the admin API (POST /api/v1/<Method> with the request as
// protobuf JSON, plus GET shortcuts for listings).
import { type DescMethod, fromJson, type JsonValue, toJson } from '@bufbuild/protobuf';
import express, { type NextFunction, type Request, type Response } from 'express';
import type { Logger } from 'pino';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import { escapeUnsafe, quote } from '../../proto/text.js';
import type { State } from '../state/state.js';
import type { AdminContext, AdminHandlers } from './admin.js';
import { adminActor, peerAddress } from './auth.js';
import { bearerMatches } from './bearer.js';
import type { Metrics } from './metrics.js';
import { RateLimiter } from './ratelimit.js';
import { ReleaseDir, releaseRoutes } from './releases.js';
import { toStatus } from './status.js';
import type { AuthThrottle } from './throttle.js';

export interface HttpDeps {
  handlers: AdminHandlers;
  state: State;
  metrics: Metrics;
  databaseOk: () => Promise<boolean>;
  log: Logger;
  releases?: ReleaseDir;
  limiter?: RateLimiter;
  /** When set, /metrics answers only requests with "Authorization: Bearer <token>". */
  metricsToken?: string;
  throttle: AuthThrottle;
}

/** A policy of 1 MiB, escaped as JSON, with room to spare. */
const MAX_BODY = '4mb';

const GET_SHORTCUTS: Record<string, { method: string; query: string[] }> = {
  '/projects': { method: 'ListProjects', query: [] },
  '/nodes': { method: 'ListNodes', query: ['project'] },
  '/authkeys': { method: 'ListAuthKeys', query: ['project'] },
  '/apikeys': { method: 'ListApiKeys', query: [] },
  '/policy': { method: 'GetPolicy', query: ['project'] },
  '/versions': { method: 'ListDesiredVersions', query: ['project'] },
  '/health': { method: 'Health', query: [] },
  '/audit': { method: 'ListAuditEntries', query: ['project', 'since', 'limit'] },
};

export function httpApp({
  handlers,
  state,
  metrics,
  databaseOk,
  log,
  releases = new ReleaseDir(null),
  limiter = new RateLimiter(10, 100),
  metricsToken,
  throttle,
}: HttpDeps): express.Express {
  const app = express();
  app.disable('x-powered-by');
  app.get('/healthz', (_req, res) => {
    res.type('text/plain').send('ok\n');
  });
  app.get('/readyz', async (_req, res) => {
    const ok = await databaseOk();
    res
      .status(ok ? 200 : 503)
      .type('text/plain')
      .send(ok ? 'ready\n' : 'database unavailable\n');
  });
  app.get('/metrics', async (req, res) => {
    if (metricsToken !== undefined) {
      // The token is a secret like an API key: guessing it spends the same per-address budget.
      const peer = peerAddress(req.socket.remoteAddress ?? '');
      try {
        throttle.check('rest', peer, 'GET /metrics');
      } catch (err) {
        res
          .status(429)
          .type('text/plain')
          .send(`${(err as Error).message}\n`);
        return;
      }
      if (!bearerMatches(req.get('authorization'), metricsToken)) {
        throttle.failed('rest', peer, 'GET /metrics', 'bad or missing metrics token');
        res
          .status(401)
          .set('www-authenticate', 'Bearer')
          .type('text/plain')
          .send('metrics need a bearer token\n');
        return;
      }
    }
    res.type(metrics.registry.contentType).send(await metrics.registry.metrics());
  });

  app.use(releaseRoutes({ releases, state, limiter, log }));

  const methods = new Map<string, DescMethod>(AdminService.methods.map((m) => [m.name, m]));
  const api = express.Router();
  // The key is checked before the body is read: an unauthenticated caller costs no parsing.
  api.use(async (req: Request, res: Response, next: NextFunction) => {
    const peer = peerAddress(req.socket.remoteAddress ?? '');
    const route = `${req.method} ${req.path.slice(0, 64)}`;
    try {
      throttle.check('rest', peer, route);
      res.locals.ctx = await adminActor(state, req.get('authorization'), false);
      next();
    } catch (err) {
      const s = toStatus(err, log, { http: route });
      if (s.http === 401) throttle.failed('rest', peer, route, s.details);
      res.status(s.http).json({ error: s.details });
    }
  });
  api.use(express.json({ limit: MAX_BODY }));
  const call = async (res: Response, name: string, body: JsonValue) => {
    const m = methods.get(name);
    if (!m) {
      res.status(404).json({ error: `no admin method ${quote(name)}` });
      return;
    }
    try {
      let req: unknown;
      try {
        req = fromJson(m.input, body ?? {});
      } catch (err) {
        const why = escapeUnsafe((err as Error).message.slice(0, 200));
        res.status(400).json({ error: `bad request body for ${name}: ${why}` });
        return;
      }
      const handler = handlers[m.localName as keyof AdminHandlers] as (
        r: unknown,
        c: AdminContext,
      ) => Promise<never>;
      const out = await handler(req, res.locals.ctx as AdminContext);
      res.json(toJson(m.output, out, { alwaysEmitImplicit: true }));
    } catch (err) {
      send(res, err, name);
    }
  };
  for (const [path, { method, query }] of Object.entries(GET_SHORTCUTS)) {
    api.get(path, (req, res) =>
      call(
        res,
        method,
        Object.fromEntries(
          query.filter((q) => req.query[q] !== undefined).map((q) => [q, String(req.query[q])]),
        ),
      ),
    );
  }
  api.post('/:method', (req, res) => call(res, String(req.params.method), req.body as JsonValue));
  app.use('/api/v1', api);
  app.use((req: Request, res: Response) => {
    res.status(404).json({ error: `no route ${req.method} ${quote(req.path)}` });
  });
  // Express would answer with an HTML page with a stack trace; callers get one JSON line, the log the rest.
  app.use((err: unknown, req: Request, res: Response, _next: NextFunction) => {
    const e = err as { type?: string; status?: number };
    if (e.type === 'entity.too.large') {
      res.status(413).json({ error: `request body is larger than ${MAX_BODY}` });
    } else if (e.type === 'entity.parse.failed') {
      res.status(400).json({ error: 'request body is not valid JSON' });
    } else if (typeof e.status === 'number' && e.status >= 400 && e.status < 500) {
      res.status(e.status).json({ error: 'bad request' });
    } else {
      log.error({ err, http: req.path }, 'internal error');
      res.status(500).json({ error: 'internal error; see the coordinator log' });
    }
  });

  function send(res: Response, err: unknown, what: string) {
    const s = toStatus(err, log, { http: what });
    res.status(s.http).json({ error: s.details });
  }
  return app;
}
