// What an admin caller may do. Global keys (and the local socket) may do
// everything; a scoped key sees and changes only its projects, and a
// read-only key only reads. Every admin method has a rule here, and
// `scoped` applies them before the handler runs, for gRPC and REST alike.
//
// A project outside the key's scope looks exactly like one that does not
// exist (NOT_FOUND), so a key learns nothing about other tenants; a method
// the key may never call (a write with a read-only key, projects and API
// keys with a scoped key) is PERMISSION_DENIED.
import type { MessageShape } from '@bufbuild/protobuf';
import type { AdminService } from '../../proto/gen/meshgate/v1/admin_pb.js';
import { CoordinatorError, denied, invalid, notFound } from '../state/errors.js';
import type { State } from '../state/state.js';

export interface Scope {
  /** Projects the caller may see and change; null for all. */
  projects: readonly string[] | null;
  readOnly: boolean;
}

export const GLOBAL_SCOPE: Scope = { projects: null, readOnly: false };

export interface AdminContext {
  actor: string;
  scope: Scope;
}

type Methods = (typeof AdminService)['method'];
type Req<K extends keyof Methods> = MessageShape<Methods[K]['input']>;
type Res<K extends keyof Methods> = MessageShape<Methods[K]['output']>;
type Handler<K extends keyof Methods> = (req: Req<K>, ctx: AdminContext) => Promise<Res<K>>;
type Handlers = { [K in keyof Methods]: Handler<K> };

interface Rule<K extends keyof Methods> {
  /** Refused to read-only keys. */
  write: boolean;
  /** Refused to scoped keys: projects themselves and API keys. */
  global?: boolean;
  /** The project the request names; it must be in scope. An empty name is left to `filter`. */
  project?: (req: Req<K>, state: State) => Promise<string> | string;
  /** The request names a node (id, prefix or name): it is looked up in scope only. */
  node?: true;
  /** For listings across projects: drops what the caller may not see. */
  filter?: (res: Res<K>, sees: (project: string) => boolean, state: State) => void;
}

const byProject = <K extends keyof Methods>(req: Req<K>) => (req as { project: string }).project;
const node = <K extends keyof Methods>(write: boolean): Rule<K> => ({ write, node: true });

const RULES: { [K in keyof Methods]: Rule<K> } = {
  health: {
    write: false,
    // The count of other tenants' nodes is theirs too.
    filter: (res, sees, state) => {
      res.nodesOnline = state.listNodes().filter((n) => sees(n.project) && state.isOnline(n.id)).length;
    },
  },

  createProject: { write: true, global: true },
  listProjects: {
    write: false,
    filter: (res, sees) => {
      res.projects = res.projects.filter((p) => sees(p.name));
    },
  },
  deleteProject: { write: true, global: true },
  // A limit the operator sets on a tenant: a key scoped to the project may not lift it.
  setProjectMaxKeyAge: { write: true, global: true },

  createAuthKey: { write: true, project: byProject },
  listAuthKeys: { write: false, project: byProject },
  expireAuthKey: {
    write: true,
    project: async (req, state) => (await state.keys.authKeyProject(req.id)) ?? '',
  },

  createApiKey: { write: true, global: true },
  listApiKeys: { write: false, global: true },
  expireApiKey: { write: true, global: true },
  rotateApiKey: { write: true, global: true },

  listNodes: {
    write: false,
    project: byProject,
    filter: (res, sees) => {
      res.nodes = res.nodes.filter((n) => sees(n.project));
    },
  },
  getNode: node(false),
  deleteNode: node(true),
  expireNode: node(true),
  renameNode: node(true),
  setNodeTags: node(true),
  setNodeRoutes: node(true),

  getPolicy: { write: false, project: byProject },
  setPolicy: { write: true, project: byProject },
  checkPolicy: { write: false, project: byProject },

  setDesiredVersion: { write: true, project: byProject },
  listDesiredVersions: {
    write: false,
    project: byProject,
    filter: (res, sees) => {
      res.desiredVersions = res.desiredVersions.filter((v) => sees(v.project));
      res.drift = res.drift.filter((n) => sees(n.project));
      res.nodes = res.nodes.filter((n) => sees(n.project));
    },
  },

  // The handler narrows an unnamed project to the caller's scope in its query,
  // so that --limit counts only entries the caller may see.
  listAuditEntries: { write: false, project: byProject },
};

/** Wraps every handler with its rule. */
export function scoped(handlers: Handlers, state: State): Handlers {
  const out: Record<string, Handler<keyof Methods>> = {};
  for (const name of Object.keys(handlers) as (keyof Methods)[]) {
    const rule = RULES[name] as Rule<keyof Methods>;
    const handler = handlers[name] as Handler<keyof Methods>;
    out[name] = async (req, ctx) => {
      const { scope } = ctx;
      if (rule.write && scope.readOnly) throw denied('this API key is read-only');
      const projects = scope.projects;
      if (projects === null) return handler(req, ctx);
      if (rule.global)
        throw denied(
          `this API key is limited to ${describe(projects)}; projects and API keys need a global key`,
        );
      const visible = new Set(projects);
      const sees = (p: string) => visible.has(p);
      if (rule.node) {
        const r = req as { id: string; project: string };
        if (r.project) requireVisible(state, sees, r.project);
        else r.project = resolveInScope(state, r.id, projects);
      }
      if (rule.project) {
        // Empty: the handler refuses it as for any caller, or it is a listing filtered below.
        const project = await rule.project(req, state);
        if (project) requireVisible(state, sees, project);
      }
      const res = await handler(req, ctx);
      rule.filter?.(res, sees, state);
      return res;
    };
  }
  return out as Handlers;
}

function describe(projects: readonly string[]): string {
  return projects.length === 1 ? `project ${projects[0]}` : `projects ${projects.join(', ')}`;
}

function requireVisible(state: State, sees: (p: string) => boolean, project: string): void {
  state.requireProject(project);
  if (!sees(project)) throw notFound(`project "${project}" does not exist`);
}

/** The project of the node `ref` names among the caller's projects only. */
function resolveInScope(state: State, ref: string, projects: readonly string[]): string {
  const found = new Set<string>();
  for (const p of projects) {
    try {
      state.requireProject(p);
      found.add(state.resolveNode(ref, p).project);
    } catch (err) {
      if (!(err instanceof CoordinatorError && err.kind === 'not-found')) throw err;
    }
  }
  if (found.size === 1) return [...found][0]!;
  if (found.size > 1) throw invalid(`node name ${quote(ref)} exists in several projects; add --project`);
  throw notFound(`no node ${quote(ref)}`);
}

/** Refs come straight from the caller and are not validated yet: quote only a prefix. */
const quote = (s: string) => JSON.stringify(s.length > 64 ? `${s.slice(0, 64)}…` : s);
