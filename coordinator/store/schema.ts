// Table shapes as Kysely sees them. Times are milliseconds since the epoch,
// booleans 0/1 and lists JSON text, so the same queries run on SQLite and
// PostgreSQL.
import type { Generated } from 'kysely';

export interface ProjectTable {
  name: string;
  created_at: number;
  /** Never reused (see id_counters); the column allows null only because migration 0005 added it. */
  numeric_id: number | null;
  /** Nodes whose key is older are cut off the mesh until they rotate; NULL: no limit. */
  max_key_age_ms: number | null;
}

export interface IdCounterTable {
  /** "projects" or "nodes". */
  name: string;
  /** The highest number handed out so far. */
  last: number;
}

export interface GlobalPolicyTable {
  /** Always 1: there is one global policy. */
  id: number;
  source: string;
  updated_at: number;
}

export interface AuthKeyTable {
  id: string;
  project: string;
  secret_hash: string;
  reusable: number;
  ephemeral: number;
  tags: string;
  reason: string;
  created_at: number;
  expires_at: number;
  used_count: number;
  revoked_at: number | null;
}

export interface ApiKeyTable {
  id: string;
  secret_hash: string;
  description: string;
  created_at: number;
  expires_at: number;
  last_seen: number | null;
  revoked_at: number | null;
  /** JSON list of project names; NULL for a global key. */
  projects: string | null;
  read_only: number;
}

export interface NodeTable {
  id: string;
  project: string;
  name: string;
  machine_key: string;
  node_key: string;
  ipv4: string;
  ipv6: string;
  ip_index: number;
  tags: string;
  ephemeral: number;
  auth_key_id: string;
  hostname: string;
  os: string;
  version: string;
  endpoints: string;
  advertised_routes: string;
  approved_routes: string;
  created_at: number;
  last_seen: number | null;
  expires_at: number | null;
  /** JSON list of the TCP ports the agent reachable only over the mesh (--lockdown-ssh). */
  lockdown_ports: string;
  numeric_id: number | null;
  /** When node_key was set; null only in rows written before migration 0009. */
  key_set_at: number | null;
}

export interface PolicyTable {
  project: string;
  source: string;
  updated_at: number;
}

export interface DesiredVersionTable {
  project: string;
  tag: string;
  version: string;
  updated_at: number;
  artifact_url: string;
  sha256: string;
  /** 0 or 1. */
  allow_downgrade: number;
  /** The signed manifest of a served release, as JSON; empty for an artifact elsewhere. */
  manifest: string;
  /** At most this many nodes of the entry update at once. */
  max_unavailable: number;
}

export interface AuditTable {
  id: Generated<number>;
  at: number;
  actor: string;
  action: string;
  target: string;
  /** The project the change belongs to; NULL for API keys. */
  project: string | null;
  detail: string;
}

/** One committed change, for coordinators sharing a PostgreSQL database (see docs/ha.md). */
export interface ChangeTable {
  seq: Generated<number>;
  at: number;
  /** The coordinator that made it; it skips its own changes. */
  origin: string;
  kind: string;
  ref: string;
}

/** Coordinators alive on this database; a row whose lease passed belongs to a dead one. */
export interface ReplicaTable {
  id: string;
  started_at: number;
  expires_at: number;
  /** grpcs://HOST:PORT where the others forward relay datagrams to it; '' when they cannot. */
  address: string;
}

/** The one secret coordinators on this database present to each other. */
export interface ReplicaSecretTable {
  id: number;
  secret: string;
}

/** A node streaming to a coordinator: online means a row whose replica is alive. */
export interface PresenceTable {
  node_id: string;
  replica: string;
  since: number;
}

/** Periodic jobs that exactly one coordinator runs: the holder until expires_at. */
export interface LeaseTable {
  name: string;
  holder: string;
  expires_at: number;
}

export interface Database {
  projects: ProjectTable;
  auth_keys: AuthKeyTable;
  api_keys: ApiKeyTable;
  nodes: NodeTable;
  policies: PolicyTable;
  desired_versions: DesiredVersionTable;
  audit_log: AuditTable;
  id_counters: IdCounterTable;
  global_policy: GlobalPolicyTable;
  changes: ChangeTable;
  replicas: ReplicaTable;
  presence: PresenceTable;
  leases: LeaseTable;
  replica_secret: ReplicaSecretTable;
}
