// Auth keys and API keys: issued, listed, expired and checked here. Only
// hashes are stored (see secrets.ts); every mutation is audited in its own
// transaction.
import type { Kysely, Transaction } from 'kysely';
import { isTag } from '../../proto/names.js';
import { quote } from '../../proto/text.js';
import type { Database } from '../store/schema.js';
import { audit } from './audit.js';
import { invalid, notFound, unauthenticated } from './errors.js';
import { type AuthKeyRecord, authKeyFromRow, storedOptionalTime, storedTime } from './records.js';
import { issueSecret, parseSecret, type SecretKind, secretMatches } from './secrets.js';

export interface ApiKeyRecord {
  id: string;
  description: string;
  createdAt: number;
  expiresAt: number;
  lastSeen: number | null;
  revokedAt: number | null;
  /** Projects the key may see and change; null for a global key. */
  projects: string[] | null;
  readOnly: boolean;
}

export interface ApiKeyScope {
  projects: string[] | null;
  readOnly: boolean;
}

const DAY = 86_400_000;
/** last_seen of an API key is written at most this often per key. */
const API_KEY_SEEN_WRITE_MS = 60_000;

export class KeyStore {
  private readonly apiKeySeen = new Map<string, number>();

  constructor(
    private readonly db: Kysely<Database>,
    private readonly now: () => number,
    private readonly requireProject: (name: string) => void,
  ) {}

  async createAuthKey(
    actor: string,
    opts: {
      project: string;
      reusable: boolean;
      ephemeral: boolean;
      expiresInMs: number;
      tags: string[];
      reason: string;
    },
  ): Promise<{ record: AuthKeyRecord; key: string }> {
    this.requireProject(opts.project);
    for (const t of opts.tags)
      if (!isTag(t)) throw invalid(`${quote(t)} is not a tag (tag:NAME, NAME a DNS label)`);
    if (opts.expiresInMs <= 0 || opts.expiresInMs > 3650 * DAY)
      throw invalid('expiration must be between 1s and 3650d');
    const issued = issueSecret('auth');
    const now = this.now();
    const record: AuthKeyRecord = {
      id: issued.id,
      project: opts.project,
      reusable: opts.reusable,
      ephemeral: opts.ephemeral,
      tags: [...new Set(opts.tags)].sort(),
      reason: opts.reason,
      createdAt: now,
      expiresAt: now + opts.expiresInMs,
      usedCount: 0,
      revokedAt: null,
    };
    await this.db.transaction().execute(async (tx) => {
      await tx
        .insertInto('auth_keys')
        .values({
          id: record.id,
          project: record.project,
          secret_hash: issued.hash,
          reusable: record.reusable ? 1 : 0,
          ephemeral: record.ephemeral ? 1 : 0,
          tags: JSON.stringify(record.tags),
          reason: record.reason,
          created_at: record.createdAt,
          expires_at: record.expiresAt,
          used_count: 0,
          revoked_at: null,
        })
        .execute();
      await audit(tx, this.now(), actor, 'authkey.create', record.id, {
        project: record.project,
        reusable: record.reusable,
        ephemeral: record.ephemeral,
        tags: record.tags,
        reason: record.reason,
      });
    });
    return { record, key: issued.key };
  }

  async listAuthKeys(project: string): Promise<AuthKeyRecord[]> {
    this.requireProject(project);
    const rows = await this.db
      .selectFrom('auth_keys')
      .selectAll()
      .where('project', '=', project)
      .orderBy('created_at')
      .execute();
    return rows.map(authKeyFromRow);
  }

  async expireAuthKey(actor: string, id: string): Promise<AuthKeyRecord> {
    const now = this.now();
    const row = await this.db.transaction().execute(async (tx) => {
      const r = await tx.selectFrom('auth_keys').selectAll().where('id', '=', id).executeTakeFirst();
      if (!r) throw notFound(`auth key ${id} does not exist`);
      if (r.revoked_at === null) {
        await tx.updateTable('auth_keys').set({ revoked_at: now }).where('id', '=', id).execute();
        r.revoked_at = now;
      }
      await audit(tx, this.now(), actor, 'authkey.expire', id, { project: r.project });
      return r;
    });
    return authKeyFromRow(row);
  }

  async createApiKey(
    actor: string,
    expiresInMs: number,
    description: string,
    scope: ApiKeyScope = { projects: null, readOnly: false },
  ): Promise<{ record: ApiKeyRecord; key: string }> {
    if (expiresInMs <= 0 || expiresInMs > 3650 * DAY)
      throw invalid('expiration must be between 1s and 3650d');
    const projects = scope.projects === null ? null : [...new Set(scope.projects)].sort();
    for (const p of projects ?? []) this.requireProject(p);
    const issued = issueSecret('api');
    const now = this.now();
    const record: ApiKeyRecord = {
      id: issued.id,
      description,
      createdAt: now,
      expiresAt: now + expiresInMs,
      lastSeen: null,
      revokedAt: null,
      projects,
      readOnly: scope.readOnly,
    };
    await this.db.transaction().execute(async (tx) => {
      await tx
        .insertInto('api_keys')
        .values({
          id: record.id,
          secret_hash: issued.hash,
          description,
          created_at: now,
          expires_at: record.expiresAt,
          last_seen: null,
          revoked_at: null,
          projects: projects === null ? null : JSON.stringify(projects),
          read_only: scope.readOnly ? 1 : 0,
        })
        .execute();
      await audit(tx, this.now(), actor, 'apikey.create', record.id, {
        description,
        expiresAt: record.expiresAt,
        projects,
        readOnly: scope.readOnly,
      });
    });
    return { record, key: issued.key };
  }

  async listApiKeys(): Promise<ApiKeyRecord[]> {
    const rows = await this.db.selectFrom('api_keys').selectAll().orderBy('created_at').execute();
    return rows.map(apiKeyFromRow);
  }

  async expireApiKey(actor: string, id: string): Promise<ApiKeyRecord> {
    const now = this.now();
    await this.db.transaction().execute(async (tx) => {
      const r = await tx
        .updateTable('api_keys')
        .set({ revoked_at: now })
        .where('id', '=', id)
        .where('revoked_at', 'is', null)
        .executeTakeFirst();
      if (r.numUpdatedRows === 0n) {
        const found = await tx.selectFrom('api_keys').select('id').where('id', '=', id).executeTakeFirst();
        if (!found) throw notFound(`API key ${id} does not exist`);
      }
      await audit(tx, this.now(), actor, 'apikey.expire', id);
    });
    return this.requireApiKey(id);
  }

  async rotateApiKey(
    actor: string,
    id: string,
    expiresInMs: number | null,
  ): Promise<{ record: ApiKeyRecord; key: string }> {
    const old = await this.requireApiKey(id);
    const lifetime = expiresInMs ?? old.expiresAt - old.createdAt;
    const created = await this.createApiKey(actor, lifetime, old.description, old);
    await this.expireApiKey(actor, id);
    return created;
  }

  private async requireApiKey(id: string): Promise<ApiKeyRecord> {
    const row = await this.db.selectFrom('api_keys').selectAll().where('id', '=', id).executeTakeFirst();
    if (!row) throw notFound(`API key ${id} does not exist`);
    return apiKeyFromRow(row);
  }

  /** The stored row of the key `text`, when its secret matches; never says more than "unknown". */
  private async lookup(kind: 'auth', text: string): Promise<Database['auth_keys']>;
  private async lookup(kind: 'api', text: string): Promise<Database['api_keys']>;
  private async lookup(kind: SecretKind, text: string): Promise<{ secret_hash: string }> {
    const name = kind === 'auth' ? 'auth key' : 'API key';
    const parsed = parseSecret(kind, text);
    if (!parsed) throw unauthenticated(`malformed ${name} (expected mgkey_${kind}_…)`);
    const table = kind === 'auth' ? 'auth_keys' : 'api_keys';
    const row = await this.db.selectFrom(table).selectAll().where('id', '=', parsed.id).executeTakeFirst();
    if (!row || !secretMatches(parsed.secret, row.secret_hash)) throw unauthenticated(`unknown ${name}`);
    return row;
  }

  /** The project of auth key `id`, if it exists. */
  async authKeyProject(id: string): Promise<string | undefined> {
    const row = await this.db
      .selectFrom('auth_keys')
      .select('project')
      .where('id', '=', id)
      .executeTakeFirst();
    return row?.project;
  }

  /** Returns the key; throws unauthenticated without saying which check failed beyond what helps the owner. */
  async authenticateApiKey(text: string): Promise<ApiKeyRecord> {
    const row = await this.lookup('api', text);
    const now = this.now();
    if (row.revoked_at !== null) throw unauthenticated(`API key ${row.id} was expired`);
    if (storedTime(row.expires_at) <= now)
      throw unauthenticated(`API key ${row.id} expired; create a new one with "meshgate apikeys create"`);
    if (now - (this.apiKeySeen.get(row.id) ?? 0) > API_KEY_SEEN_WRITE_MS) {
      this.apiKeySeen.set(row.id, now);
      await this.db.updateTable('api_keys').set({ last_seen: now }).where('id', '=', row.id).execute();
    }
    return apiKeyFromRow(row);
  }

  /** The auth key `text` names, if it may join a machine now; throws with the reason otherwise. */
  async usableAuthKey(text: string): Promise<AuthKeyRecord> {
    const key = authKeyFromRow(await this.lookup('auth', text));
    if (key.revokedAt !== null) throw unauthenticated(`auth key ${key.id} was expired by an admin`);
    if (key.expiresAt <= this.now()) throw unauthenticated(`auth key ${key.id} expired; ask for a new one`);
    if (!key.reusable && key.usedCount > 0)
      throw unauthenticated(`auth key ${key.id} is single-use and was already used by another machine`);
    return key;
  }

  /**
   * The auth key `text` names, also when spent or past its expiry: it proves
   * that the caller was given a key of the project (install.sh at a later boot).
   */
  async heldAuthKey(text: string): Promise<AuthKeyRecord> {
    const key = authKeyFromRow(await this.lookup('auth', text));
    if (key.revokedAt !== null) throw unauthenticated(`auth key ${key.id} was expired by an admin`);
    return key;
  }

  /** Counts a use inside the registration's transaction; a single-use key can be spent once. */
  async spend(tx: Transaction<Database>, key: AuthKeyRecord): Promise<void> {
    let q = tx
      .updateTable('auth_keys')
      .set((eb) => ({ used_count: eb('used_count', '+', 1) }))
      .where('id', '=', key.id);
    if (!key.reusable) q = q.where('used_count', '=', 0);
    const r = await q.executeTakeFirst();
    if (r.numUpdatedRows === 0n)
      throw unauthenticated(`auth key ${key.id} is single-use and was already used by another machine`);
  }
}

function apiKeyFromRow(r: Database['api_keys']): ApiKeyRecord {
  return {
    id: r.id,
    description: r.description,
    createdAt: storedTime(r.created_at),
    expiresAt: storedTime(r.expires_at),
    lastSeen: storedOptionalTime(r.last_seen),
    revokedAt: storedOptionalTime(r.revoked_at),
    projects: r.projects === null ? null : (JSON.parse(r.projects) as string[]),
    readOnly: Number(r.read_only) === 1,
  };
}
