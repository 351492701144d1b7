// Headscale v0.28's gRPC API (headscale.v1.HeadscaleService), as metal-api and
// metal-apiserver call it, mapped onto the state: a user is a project, a
// pre-auth key an auth key, a node a node, the policy the global policy. No
// state of its own: numbers for users and nodes are the state's numeric ids,
// those of keys their public prefixes read as hexadecimal.
import { create, type MessageShape } from '@bufbuild/protobuf';
import { timestampFromMs, timestampMs } from '@bufbuild/protobuf/wkt';
import * as grpc from '@grpc/grpc-js';
import type { Logger } from 'pino';
import * as hs from '../../proto/gen/headscale/v1/headscale_pb.js';
import { serviceDefinition } from '../../proto/grpc.js';
import { CoordinatorError, invalid, notFound } from '../state/errors.js';
import type { NodeRecord } from '../state/records.js';
import type { ProjectRecord, State } from '../state/state.js';
import { type ActorHandler, authenticatedImplementation } from './grpc-admin.js';
import type { StatusLike } from './status.js';
import type { AuthThrottle } from './throttle.js';
import { LIMITS, sized, tags } from './validate.js';

const HOUR = 3_600_000;

type Methods = (typeof hs.HeadscaleService)['method'];
type Handler<K extends keyof Methods> = (
  req: MessageShape<Methods[K]['input']>,
  ctx: { actor: string },
) => Promise<MessageShape<Methods[K]['output']>>;
export type HeadscaleHandlers = { [K in keyof Methods]: Handler<K> };

/** A status this API must answer with exactly, where Headscale's clients depend on it. */
class HeadscaleStatus extends Error {
  constructor(
    readonly code: grpc.status,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Methods of HeadscaleService that meshgate does not serve, and what to use
 * instead. Named here without messages: a call gets UNIMPLEMENTED whatever it sends.
 */
const NOT_SERVED: Record<string, string> = {
  RenameUser: 'projects keep their name; create another with "meshgate projects create NAME"',
  ListPreAuthKeys: 'use "meshgate keys list --project P"',
  ExpirePreAuthKey: 'use "meshgate keys expire ID"',
  DeletePreAuthKey: 'auth keys are kept for the audit trail; expire one with "meshgate keys expire ID"',
  DebugCreateNode: 'nodes register themselves: "meshgate agent --auth-key-file F"',
  RegisterNode: 'nodes register with an auth key: "meshgate keys create --project P", then "meshgate agent"',
  SetApprovedRoutes: 'use "meshgate nodes routes NODE --approve CIDR,…"',
  MoveNode: 'a node stays in its project; delete it and join it again with a key of the other project',
  BackfillNodeIPs: 'addresses are given at registration; there is nothing to backfill',
  CreateApiKey: 'use "meshgate apikeys create"',
  ExpireApiKey: 'use "meshgate apikeys expire ID"',
  DeleteApiKey: 'API keys are kept for the audit trail; expire one with "meshgate apikeys expire ID"',
};

const ts = (ms: number | null) => (ms === null ? undefined : timestampFromMs(ms));

/** Key prefixes are 12 hex digits, so they fit a uint64 both ways. */
const keyNumber = (prefix: string) => BigInt(`0x${prefix}`);

function numberOf(id: bigint): number {
  return id > 0n && id <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(id) : 0;
}

function userMessage(p: ProjectRecord): hs.User {
  return create(hs.UserSchema, { id: BigInt(p.numericId), name: p.name, createdAt: ts(p.createdAt) });
}

/** WireGuard's base64 public key in Headscale's notation. */
function nodeKey(base64: string): string {
  return `nodekey:${Buffer.from(base64, 'base64').toString('hex')}`;
}

export interface HeadscaleDeps {
  state: State;
  databaseOk: () => Promise<boolean>;
}

export function headscaleHandlers({ state, databaseOk }: HeadscaleDeps): HeadscaleHandlers {
  const user = (name: string) => userMessage(state.requireProject(name));
  const node = (n: NodeRecord) =>
    create(hs.NodeSchema, {
      id: BigInt(n.numericId),
      machineKey: `mkey:${n.machineKey}`,
      nodeKey: nodeKey(n.nodeKey),
      ipAddresses: [n.ipv4, n.ipv6],
      // metal-stack finds a machine's node by the name its agent asked for (the machine UUID).
      name: n.hostname,
      givenName: n.name,
      user: user(n.project),
      lastSeen: ts(n.lastSeen),
      expiry: ts(n.expiresAt),
      createdAt: ts(n.createdAt),
      registerMethod: hs.RegisterMethod.AUTH_KEY,
      online: state.isOnline(n.id),
      approvedRoutes: n.approvedRoutes,
      availableRoutes: n.advertisedRoutes,
      subnetRoutes: n.approvedRoutes,
      tags: n.tags,
    });
  const project = (id: bigint) => {
    const p = state.projectByNumber(numberOf(id));
    if (!p) throw notFound(`user ${id} does not exist`);
    return p;
  };
  const nodeById = (id: bigint) => {
    const n = state.nodeByNumber(numberOf(id));
    if (!n) throw notFound(`node ${id} does not exist`);
    return n;
  };

  return {
    async createUser(req, { actor }) {
      try {
        return create(hs.CreateUserResponseSchema, {
          user: userMessage(await state.createProject(actor, req.name)),
        });
      } catch (err) {
        // Both metal-stack clients look for this text to tell "exists already" from a failure.
        if (err instanceof CoordinatorError && err.kind === 'exists')
          throw new HeadscaleStatus(
            grpc.status.INTERNAL,
            `failed to create user: UNIQUE constraint failed: users.name: ${err.message}`,
          );
        throw err;
      }
    },
    async deleteUser(req, { actor }) {
      await state.deleteProject(actor, project(req.id).name, false);
      return create(hs.DeleteUserResponseSchema, {});
    },
    async listUsers(req) {
      const users = state
        .listProjects()
        .filter(
          (p) =>
            (req.id === 0n || BigInt(p.numericId) === req.id) &&
            (!req.name || p.name === req.name) &&
            // Projects have no e-mail address, so a search by one finds none.
            !req.email,
        )
        .map(userMessage);
      return create(hs.ListUsersResponseSchema, { users });
    },

    async createPreAuthKey(req, { actor }) {
      const p = project(req.user);
      const now = state.now();
      const expiresAt = req.expiration ? timestampMs(req.expiration) : now + HOUR;
      if (expiresAt <= now) throw invalid('expiration is in the past');
      const { record, key } = await state.keys.createAuthKey(actor, {
        project: p.name,
        reusable: req.reusable,
        ephemeral: req.ephemeral,
        expiresInMs: expiresAt - now,
        tags: tags('acl_tags', req.aclTags),
        reason: '',
      });
      return create(hs.CreatePreAuthKeyResponseSchema, {
        preAuthKey: {
          user: userMessage(p),
          id: keyNumber(record.id),
          key,
          reusable: record.reusable,
          ephemeral: record.ephemeral,
          used: false,
          expiration: ts(record.expiresAt),
          createdAt: ts(record.createdAt),
          aclTags: record.tags,
        },
      });
    },

    async getNode(req) {
      return create(hs.GetNodeResponseSchema, { node: node(nodeById(req.nodeId)) });
    },
    async setTags(req, { actor }) {
      const n = nodeById(req.nodeId);
      const changed = await state.setNodeTags(actor, n.id, n.project, tags('tags', req.tags));
      return create(hs.SetTagsResponseSchema, { node: node(changed) });
    },
    async deleteNode(req, { actor }) {
      const n = nodeById(req.nodeId);
      await state.deleteNode(actor, n.id, n.project);
      return create(hs.DeleteNodeResponseSchema, {});
    },
    async expireNode(req, { actor }) {
      const n = nodeById(req.nodeId);
      const at = req.expiry ? timestampMs(req.expiry) : state.now();
      return create(hs.ExpireNodeResponseSchema, {
        node: node(await state.expireNode(actor, n.id, n.project, at)),
      });
    },
    async renameNode(req, { actor }) {
      const n = nodeById(req.nodeId);
      return create(hs.RenameNodeResponseSchema, {
        node: node(await state.renameNode(actor, n.id, n.project, req.newName)),
      });
    },
    async listNodes(req) {
      // An unknown user has no nodes, which is no error: metal-stack asks before the user exists.
      if (req.user && !state.getProject(req.user)) return create(hs.ListNodesResponseSchema, {});
      const nodes = state.listNodes(req.user || undefined);
      return create(hs.ListNodesResponseSchema, { nodes: nodes.map(node) });
    },

    async listApiKeys() {
      const apiKeys = (await state.keys.listApiKeys()).map((k) =>
        create(hs.ApiKeySchema, {
          id: keyNumber(k.id),
          prefix: k.id,
          expiration: ts(k.revokedAt !== null ? Math.min(k.revokedAt, k.expiresAt) : k.expiresAt),
          createdAt: ts(k.createdAt),
          lastSeen: ts(k.lastSeen),
        }),
      );
      return create(hs.ListApiKeysResponseSchema, { apiKeys });
    },

    async getPolicy() {
      const p = state.getGlobalPolicy();
      return create(hs.GetPolicyResponseSchema, {
        policy: p?.source ?? '',
        updatedAt: ts(p?.updatedAt ?? null),
      });
    },
    async setPolicy(req, { actor }) {
      const at = await state.setGlobalPolicy(actor, sized('policy', req.policy, LIMITS.policy));
      return create(hs.SetPolicyResponseSchema, { policy: req.policy, updatedAt: ts(at) });
    },

    async health() {
      return create(hs.HealthResponseSchema, { databaseConnectivity: await databaseOk() });
    },
  };
}

function headscaleStatus(err: unknown): StatusLike | undefined {
  return err instanceof HeadscaleStatus ? { code: err.code, http: 500, details: err.message } : undefined;
}

/** The service definition and implementation to add to a gRPC server, the methods not served included. */
export function headscaleService(
  handlers: HeadscaleHandlers,
  state: State,
  log: Logger,
  throttle: AuthThrottle,
): { definition: grpc.ServiceDefinition; implementation: grpc.UntypedServiceImplementation } {
  const options = { state, log, throttle, status: headscaleStatus };
  // Headscale has no scoped keys, and this API does not narrow its answers to a scope.
  const globalOnly = Object.fromEntries(
    Object.entries(handlers as unknown as Record<string, ActorHandler>).map(([name, h]) => [
      name,
      (async (req, ctx) => {
        if (ctx.scope.projects !== null || ctx.scope.readOnly)
          throw new HeadscaleStatus(
            grpc.status.PERMISSION_DENIED,
            "the Headscale API needs a global API key; scoped and read-only keys work with meshgate's own API",
          );
        return h(req, ctx);
      }) satisfies ActorHandler,
    ]),
  );
  const served = authenticatedImplementation(hs.HeadscaleService.methods, globalOnly, options);
  const definition: Record<string, grpc.MethodDefinition<Buffer, Buffer>> = {};
  const notServed: Record<string, ActorHandler> = {};
  const methods = Object.entries(NOT_SERVED).map(([name, instead]) => {
    const localName = name[0]!.toLowerCase() + name.slice(1);
    definition[localName] = {
      path: `/${hs.HeadscaleService.typeName}/${name}`,
      requestStream: false,
      responseStream: false,
      requestSerialize: (b) => b,
      requestDeserialize: (b) => b,
      responseSerialize: (b) => b,
      responseDeserialize: (b) => b,
    };
    notServed[localName] = async () => {
      throw new HeadscaleStatus(grpc.status.UNIMPLEMENTED, `meshgate does not serve ${name}: ${instead}`);
    };
    return { name, localName };
  });
  return {
    definition: { ...serviceDefinition(hs.HeadscaleService), ...definition } as grpc.ServiceDefinition,
    implementation: { ...served, ...authenticatedImplementation(methods, notServed, options) },
  };
}
