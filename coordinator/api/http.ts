// The HTTP listener: liveness, readiness, Prometheus metrics and a REST
// mirror of the admin API (POST /api/v1/<Method> with the request as
// protobuf JSON, plus GET shortcuts for listings).
import { type DescMethod, fromJson, type JsonValue, toJson } from '@bufbuild/protobuf';
import express, { type NextFunction, type Request, type Response } from 'express';
import type { Logger } from 'pino';
import { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import type { State } from '../state/state.js';
import type { AdminContext, AdminHandlers } from './admin.js';
import { adminActor } from './auth.js';
import { bearerMatches } from './bearer.js';
import type { Metrics } from './metrics.js';
import { RateLimiter } from './ratelimit.js';
import { ReleaseDir, releaseRoutes } from './releases.js';
import { toStatus } from './status.js';

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
}

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
      .send(ok ? 'ready\n' : 'database unreachable\n');
  });
  app.get('/metrics', async (req, res) => {
    if (metricsToken !== undefined && !bearerMatches(req.get('authorization'), metricsToken)) {
      log.warn(
        { peer: req.socket.remoteAddress, reason: 'bad or missing metrics token' },
        'refused metrics scrape',
      );
      res
        .status(401)
        .set('www-authenticate', 'Bearer')
        .type('text/plain')
        .send('metrics need a bearer token\n');
      return;
    }
    res.type(metrics.registry.contentType).send(await metrics.registry.metrics());
  });

  app.use(releaseRoutes({ releases, state, limiter, log }));

  const methods = new Map<string, DescMethod>(AdminService.methods.map((m) => [m.name, m]));
  const api = express.Router();
  api.use(express.json({ limit: '2mb' }));
  api.use(async (req: Request, res: Response, next: NextFunction) => {
    try {
      res.locals.ctx = await adminActor(state, req.get('authorization'), false);
      next();
    } catch (err) {
      send(res, err, req.path);
    }
  });
  const call = async (res: Response, name: string, body: JsonValue) => {
    const m = methods.get(name);
    if (!m) {
      res.status(404).json({ error: `no admin method ${name}` });
      return;
    }
    try {
      let req: unknown;
      try {
        req = fromJson(m.input, body ?? {});
      } catch (err) {
        res.status(400).json({ error: `bad request body for ${name}: ${(err as Error).message}` });
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

  function send(res: Response, err: unknown, what: string) {
    const s = toStatus(err, log, { http: what });
    res.status(s.http).json({ error: s.details });
  }
  return app;
}
