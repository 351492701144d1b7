// The admin API's handlers, shared by gRPC (TCP and local socket) and the
// REST mirror. Each takes a request message and the caller's identity; what
// a caller may do is decided in scope.ts before a handler runs.
import { create, type DescMessage, type MessageShape } from '@bufbuild/protobuf';
import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import * as pb from '../../proto/gen/meshgate/v1/admin_pb.js';
import {
  type AdminService,
  type ApiKey,
  ApiKeySchema,
  AuditEntrySchema,
  type AuthKey,
  AuthKeySchema,
  DesiredVersionSchema,
  PolicyTestResultSchema,
  type Project,
  ProjectSchema,
} from '../../proto/gen/meshgate/v1/admin_pb.js';
import { isDnsLabel } from '../../proto/names.js';
import { isSemVer } from '../../release/semver.js';
import { nodeMessage } from '../mapper/netmap.js';
import type { AuditEntry } from '../state/audit.js';
import { invalid, precondition } from '../state/errors.js';
import type { AuthKeyRecord } from '../state/records.js';
import type { ApiKeyRecord, DesiredVersionRecord, State } from '../state/state.js';
import { ReleaseDir } from './releases.js';
import { type AdminContext, scoped } from './scope.js';
import { bounded, duration, isCidr, LIMITS, list, sized, tags, text } from './validate.js';

export type { AdminContext } from './scope.js';

const HOUR = 3_600_000;
const DAY = 24 * HOUR;

/** Projects one API key may be limited to. */
const MAX_KEY_PROJECTS = 256;
/** Entries ListAuditEntries returns without a limit, and at most. */
const AUDIT_LIMIT = { fallback: 100, max: 10_000 };

export interface AdminDeps {
  state: State;
  version: string;
  databaseOk: () => Promise<boolean>;
  /** Releases this coordinator serves; none when absent. */
  releases?: ReleaseDir;
}

type Methods = (typeof AdminService)['method'];
type Handler<K extends keyof Methods> = (
  req: MessageShape<Methods[K]['input']>,
  ctx: AdminContext,
) => Promise<MessageShape<Methods[K]['output']>>;
export type AdminHandlers = { [K in keyof Methods]: Handler<K> };

const ts = (ms: number | null) => (ms === null ? undefined : timestampFromMs(ms));

function projectMessage(p: {
  name: string;
  createdAt: number;
  nodeCount: number;
  maxKeyAgeMs: number | null;
}): Project {
  return create(ProjectSchema, {
    name: p.name,
    createdAt: ts(p.createdAt),
    nodeCount: p.nodeCount,
    maxKeyAgeSeconds: p.maxKeyAgeMs === null ? 0 : Math.ceil(p.maxKeyAgeMs / 1000),
  });
}

/** "", "0" and "off" remove the limit; anything else is a duration of at least 1s. */
function maxKeyAge(value: string): number | null {
  const v = value.trim().toLowerCase();
  if (v === '' || v === '0' || v === 'off') return null;
  const ms = duration('max_key_age', v, 0);
  if (ms < 1000) throw invalid('max_key_age: at least 1s, or "off" for no limit');
  return ms;
}

function authKeyMessage(k: AuthKeyRecord, now: number, key = ''): AuthKey {
  return create(AuthKeySchema, {
    id: k.id,
    project: k.project,
    reusable: k.reusable,
    ephemeral: k.ephemeral,
    tags: k.tags,
    createdAt: ts(k.createdAt),
    expiresAt: ts(k.expiresAt),
    used: k.usedCount > 0,
    expired: k.revokedAt !== null || k.expiresAt <= now,
    reason: k.reason,
    key,
  });
}

function apiKeyMessage(k: ApiKeyRecord, now: number, key = ''): ApiKey {
  return create(ApiKeySchema, {
    id: k.id,
    createdAt: ts(k.createdAt),
    expiresAt: ts(k.expiresAt),
    lastSeen: ts(k.lastSeen),
    expired: k.revokedAt !== null || k.expiresAt <= now,
    description: k.description,
    key,
    projects: k.projects ?? [],
    readOnly: k.readOnly,
  });
}

function auditMessage(e: AuditEntry) {
  return create(AuditEntrySchema, {
    id: BigInt(e.id),
    at: ts(e.at),
    actor: e.actor,
    action: e.action,
    target: e.target,
    project: e.project ?? '',
    detail: e.detail,
  });
}

function versionMessage(v: DesiredVersionRecord) {
  return create(DesiredVersionSchema, {
    project: v.project,
    tag: v.tag,
    version: v.version,
    updatedAt: ts(v.updatedAt),
    artifactUrl: v.artifactUrl,
    sha256: v.sha256,
    allowDowngrade: v.allowDowngrade,
    maxUnavailable: v.maxUnavailable,
  });
}

function msg<D extends DescMessage>(schema: D, init: Parameters<typeof create<D>>[1]): MessageShape<D> {
  return create(schema, init);
}

export function adminHandlers(deps: AdminDeps): AdminHandlers {
  const handlers = unboundedHandlers(deps);
  const out: Record<string, unknown> = {};
  for (const m of pb.AdminService.methods) {
    const h = handlers[m.localName as keyof AdminHandlers] as (
      r: unknown,
      c: AdminContext,
    ) => Promise<unknown>;
    out[m.localName] = (req: MessageShape<typeof m.input>, ctx: AdminContext) =>
      h(bounded(m.input, req), ctx);
  }
  return out as AdminHandlers;
}

function unboundedHandlers({
  state,
  version,
  databaseOk,
  releases = new ReleaseDir(null),
}: AdminDeps): AdminHandlers {
  const node = (n: Parameters<typeof nodeMessage>[1]) => nodeMessage(state, n);
  const handlers: AdminHandlers = {
    async health() {
      return msg(pb.HealthResponseSchema, {
        databaseOk: await databaseOk(),
        version,
        nodesOnline: state.onlineCount(),
      });
    },

    async createProject(req, { actor }) {
      const p = await state.createProject(actor, req.name);
      return msg(pb.CreateProjectResponseSchema, { project: projectMessage({ ...p, nodeCount: 0 }) });
    },
    async listProjects() {
      return msg(pb.ListProjectsResponseSchema, { projects: state.listProjects().map(projectMessage) });
    },
    async setProjectMaxKeyAge(req, { actor }) {
      const p = await state.setMaxKeyAge(actor, req.project, maxKeyAge(req.maxKeyAge));
      const nodeCount = state.listProjects().find((x) => x.name === p.name)?.nodeCount ?? 0;
      return msg(pb.SetProjectMaxKeyAgeResponseSchema, { project: projectMessage({ ...p, nodeCount }) });
    },
    async deleteProject(req, { actor }) {
      await state.deleteProject(actor, req.name, req.force);
      return msg(pb.DeleteProjectResponseSchema, {});
    },

    async createAuthKey(req, { actor }) {
      const { record, key } = await state.keys.createAuthKey(actor, {
        project: req.project,
        reusable: req.reusable,
        ephemeral: req.ephemeral,
        expiresInMs: duration('expiration', req.expiration, HOUR),
        tags: tags('tags', req.tags),
        reason: text('reason', req.reason, LIMITS.reason),
      });
      return msg(pb.CreateAuthKeyResponseSchema, { authKey: authKeyMessage(record, state.now(), key) });
    },
    async listAuthKeys(req) {
      const now = state.now();
      return msg(pb.ListAuthKeysResponseSchema, {
        authKeys: (await state.keys.listAuthKeys(req.project)).map((k) => authKeyMessage(k, now)),
      });
    },
    async expireAuthKey(req, { actor }) {
      return msg(pb.ExpireAuthKeyResponseSchema, {
        authKey: authKeyMessage(await state.keys.expireAuthKey(actor, req.id), state.now()),
      });
    },

    async createApiKey(req, { actor }) {
      const { record, key } = await state.keys.createApiKey(
        actor,
        duration('expiration', req.expiration, 90 * DAY),
        text('description', req.description, LIMITS.description),
        {
          projects: req.projects.length
            ? list('projects', req.projects, MAX_KEY_PROJECTS, isDnsLabel, 'a project name')
            : null,
          readOnly: req.readOnly,
        },
      );
      return msg(pb.CreateApiKeyResponseSchema, { apiKey: apiKeyMessage(record, state.now(), key) });
    },
    async listApiKeys() {
      const now = state.now();
      return msg(pb.ListApiKeysResponseSchema, {
        apiKeys: (await state.keys.listApiKeys()).map((k) => apiKeyMessage(k, now)),
      });
    },
    async expireApiKey(req, { actor }) {
      return msg(pb.ExpireApiKeyResponseSchema, {
        apiKey: apiKeyMessage(await state.keys.expireApiKey(actor, req.id), state.now()),
      });
    },
    async rotateApiKey(req, { actor }) {
      const expires = req.expiration ? duration('expiration', req.expiration, 90 * DAY) : null;
      const { record, key } = await state.keys.rotateApiKey(actor, req.id, expires);
      return msg(pb.RotateApiKeyResponseSchema, { apiKey: apiKeyMessage(record, state.now(), key) });
    },

    async listNodes(req) {
      return msg(pb.ListNodesResponseSchema, { nodes: state.listNodes(req.project || undefined).map(node) });
    },
    async getNode(req) {
      return msg(pb.GetNodeResponseSchema, {
        node: node(state.resolveNode(req.id, req.project || undefined)),
      });
    },
    async deleteNode(req, { actor }) {
      await state.deleteNode(actor, req.id, req.project || undefined);
      return msg(pb.DeleteNodeResponseSchema, {});
    },
    async expireNode(req, { actor }) {
      const at = req.clear ? null : state.now() + duration('expiration', req.expiration, 0);
      return msg(pb.ExpireNodeResponseSchema, {
        node: node(await state.expireNode(actor, req.id, req.project || undefined, at)),
      });
    },
    async renameNode(req, { actor }) {
      return msg(pb.RenameNodeResponseSchema, {
        node: node(await state.renameNode(actor, req.id, req.project || undefined, req.name)),
      });
    },
    async setNodeTags(req, { actor }) {
      const n = await state.setNodeTags(actor, req.id, req.project || undefined, tags('tags', req.tags));
      return msg(pb.SetNodeTagsResponseSchema, { node: node(n) });
    },
    async setNodeRoutes(req, { actor }) {
      const routes = list('approved_routes', req.approvedRoutes, LIMITS.routes, isCidr, 'a CIDR');
      const n = await state.setNodeRoutes(actor, req.id, req.project || undefined, routes);
      return msg(pb.SetNodeRoutesResponseSchema, { node: node(n) });
    },

    async getPolicy(req) {
      const p = state.getPolicy(req.project);
      return msg(pb.GetPolicyResponseSchema, {
        policy: p?.source ?? '',
        updatedAt: ts(p?.updatedAt ?? null),
      });
    },
    async setPolicy(req, { actor }) {
      const at = await state.setPolicy(
        actor,
        req.project,
        sized('policy', req.policy, LIMITS.policy),
        req.force,
      );
      return msg(pb.SetPolicyResponseSchema, { updatedAt: ts(at) });
    },
    async checkPolicy(req) {
      const results = state.checkPolicy(req.project, req.policy || undefined);
      return msg(pb.CheckPolicyResponseSchema, {
        ok: results.every((r) => r.passed),
        results: results.map((r) => create(PolicyTestResultSchema, r)),
      });
    },

    async setDesiredVersion(req, { actor }) {
      let { artifactUrl, sha256 } = req;
      let manifest = '';
      if (isSemVer(req.version)) {
        if (!artifactUrl !== !sha256)
          throw invalid('give --artifact-url and --sha256 together, or neither to use a served release');
        if (!artifactUrl) {
          const m = releases.lookup(req.version);
          if (!m)
            throw precondition(
              `release ${req.version} is not served by this coordinator (${releases.dir ? `no valid release in ${releases.dir}/${req.version}` : 'no --releases-dir'}); pack it there, or give --artifact-url URL --sha256 HEX`,
            );
          sha256 = m.sha256;
          manifest = JSON.stringify(m);
        }
      }
      if (req.maxUnavailable > 10_000) throw invalid('max-unavailable must be at most 10000');
      const v = await state.setDesiredVersion(actor, req.project, req.tag, req.version, {
        artifactUrl,
        sha256,
        allowDowngrade: req.allowDowngrade,
        manifest,
        maxUnavailable: req.maxUnavailable || 1,
      });
      return msg(pb.SetDesiredVersionResponseSchema, { desiredVersion: versionMessage(v) });
    },
    async listDesiredVersions(req) {
      const project = req.project || undefined;
      const drift = state.driftingNodes(project).map(node);
      return msg(pb.ListDesiredVersionsResponseSchema, {
        desiredVersions: state.listDesiredVersions(project).map(versionMessage),
        drift,
        nodes: state.updateStates(project).map(({ node: n, desired, view }) =>
          create(pb.NodeUpdateSchema, {
            nodeId: n.id,
            name: n.name,
            project: n.project,
            running: n.version,
            desired,
            state: view.state,
            reason: view.reason,
            online: state.isOnline(n.id),
          }),
        ),
      });
    },

    async listAuditEntries(req, { scope }) {
      if (req.project) state.requireProject(req.project);
      const limit = req.limit || AUDIT_LIMIT.fallback;
      if (limit > AUDIT_LIMIT.max) throw invalid(`limit must be at most ${AUDIT_LIMIT.max}`);
      const since = req.since ? Math.max(0, state.now() - duration('since', req.since, 0)) : null;
      const entries = await state.auditLog({
        projects: req.project ? [req.project] : scope.projects,
        since,
        limit,
      });
      return msg(pb.ListAuditEntriesResponseSchema, { entries: entries.map(auditMessage) });
    },
  };
  return scoped(handlers, state);
}
