// In-memory shapes of what the store holds, and their conversion from rows.
import type { AuthKeyTable, NodeTable } from '../store/schema.js';

export interface NodeRecord {
  id: string;
  /** Stable and never reused; how Headscale's API addresses the node. */
  numericId: number;
  project: string;
  name: string;
  /** Ed25519 public key, hex. */
  machineKey: string;
  /** X25519 public key, WireGuard base64. */
  nodeKey: string;
  ipv4: string;
  ipv6: string;
  ipIndex: number;
  tags: string[];
  ephemeral: boolean;
  authKeyId: string;
  hostname: string;
  os: string;
  version: string;
  /** What the agent reported plus what the coordinator saw it connect from. */
  endpoints: string[];
  advertisedRoutes: string[];
  approvedRoutes: string[];
  createdAt: number;
  lastSeen: number | null;
  expiresAt: number | null;
  /** When nodeKey was set (registration or rotation). */
  keySetAt: number;
  /** TCP ports the node closes everywhere but on the mesh, as its agent last reported them. */
  lockdownPorts: number[];
}

export interface AuthKeyRecord {
  id: string;
  project: string;
  reusable: boolean;
  ephemeral: boolean;
  tags: string[];
  reason: string;
  createdAt: number;
  expiresAt: number;
  usedCount: number;
  revokedAt: number | null;
}

/** An expired node is cut off the mesh until an admin re-authorizes it. */
export function isNodeExpired(n: NodeRecord, now: number): boolean {
  return n.expiresAt !== null && n.expiresAt <= now;
}

const list = (text: string): string[] => JSON.parse(text) as string[];

/** The last millisecond of year 9999: far inside int64, a protobuf Timestamp and a JavaScript Date. */
export const MAX_TIME_MS = 253_402_300_799_999;

/**
 * A time as stored. Older versions accepted expiries that no timestamp can
 * hold; such a row is read as the latest time there is instead of breaking
 * every listing and netmap that includes it.
 */
export function storedTime(value: number | string | bigint): number {
  const ms = Number(value);
  if (Number.isNaN(ms)) return MAX_TIME_MS;
  return Math.min(MAX_TIME_MS, Math.max(0, Math.round(ms)));
}

export const storedOptionalTime = (value: number | string | bigint | null) =>
  value === null ? null : storedTime(value);

export function nodeFromRow(r: NodeTable): NodeRecord {
  return {
    id: r.id,
    numericId: Number(r.numeric_id),
    project: r.project,
    name: r.name,
    machineKey: r.machine_key,
    nodeKey: r.node_key,
    ipv4: r.ipv4,
    ipv6: r.ipv6,
    ipIndex: Number(r.ip_index),
    tags: list(r.tags),
    ephemeral: r.ephemeral === 1,
    authKeyId: r.auth_key_id,
    hostname: r.hostname,
    os: r.os,
    version: r.version,
    endpoints: list(r.endpoints),
    advertisedRoutes: list(r.advertised_routes),
    approvedRoutes: list(r.approved_routes),
    createdAt: storedTime(r.created_at),
    lastSeen: storedOptionalTime(r.last_seen),
    expiresAt: storedOptionalTime(r.expires_at),
    keySetAt: storedTime(r.key_set_at ?? r.created_at),
    lockdownPorts: JSON.parse(r.lockdown_ports) as number[],
  };
}

export function nodeToRow(n: NodeRecord): NodeTable {
  return {
    id: n.id,
    project: n.project,
    name: n.name,
    machine_key: n.machineKey,
    node_key: n.nodeKey,
    ipv4: n.ipv4,
    ipv6: n.ipv6,
    ip_index: n.ipIndex,
    tags: JSON.stringify(n.tags),
    ephemeral: n.ephemeral ? 1 : 0,
    auth_key_id: n.authKeyId,
    hostname: n.hostname,
    os: n.os,
    version: n.version,
    endpoints: JSON.stringify(n.endpoints),
    advertised_routes: JSON.stringify(n.advertisedRoutes),
    approved_routes: JSON.stringify(n.approvedRoutes),
    created_at: n.createdAt,
    last_seen: n.lastSeen,
    expires_at: n.expiresAt,
    lockdown_ports: JSON.stringify(n.lockdownPorts),
    numeric_id: n.numericId,
    key_set_at: n.keySetAt,
  };
}

export function authKeyFromRow(r: AuthKeyTable): AuthKeyRecord {
  return {
    id: r.id,
    project: r.project,
    reusable: r.reusable === 1,
    ephemeral: r.ephemeral === 1,
    tags: list(r.tags),
    reason: r.reason,
    createdAt: storedTime(r.created_at),
    expiresAt: storedTime(r.expires_at),
    usedCount: Number(r.used_count),
    revokedAt: storedOptionalTime(r.revoked_at),
  };
}
