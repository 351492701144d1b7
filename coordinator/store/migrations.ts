// Versioned schema migrations, run at start. Never edit a released
// migration: add a new one.
import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from 'kysely';

export type Dialect = 'sqlite' | 'postgres';

export function migrations(dialect: Dialect): Record<string, Migration> {
  return {
    '0001_initial': {
      async up(db: Kysely<unknown>) {
        await db.schema
          .createTable('projects')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .execute();
        await db.schema
          .createTable('auth_keys')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('project', 'text', (c) => c.notNull().references('projects.name').onDelete('cascade'))
          .addColumn('secret_hash', 'text', (c) => c.notNull())
          .addColumn('reusable', 'integer', (c) => c.notNull())
          .addColumn('ephemeral', 'integer', (c) => c.notNull())
          .addColumn('tags', 'text', (c) => c.notNull())
          .addColumn('reason', 'text', (c) => c.notNull())
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .addColumn('expires_at', 'bigint', (c) => c.notNull())
          .addColumn('used_count', 'integer', (c) => c.notNull())
          .addColumn('revoked_at', 'bigint')
          .execute();
        await db.schema.createIndex('auth_keys_project').on('auth_keys').column('project').execute();
        await db.schema
          .createTable('api_keys')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('secret_hash', 'text', (c) => c.notNull())
          .addColumn('description', 'text', (c) => c.notNull())
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .addColumn('expires_at', 'bigint', (c) => c.notNull())
          .addColumn('last_seen', 'bigint')
          .addColumn('revoked_at', 'bigint')
          .execute();
        await db.schema
          .createTable('nodes')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('project', 'text', (c) => c.notNull().references('projects.name').onDelete('cascade'))
          .addColumn('name', 'text', (c) => c.notNull())
          .addColumn('machine_key', 'text', (c) => c.notNull().unique())
          .addColumn('node_key', 'text', (c) => c.notNull())
          .addColumn('ipv4', 'text', (c) => c.notNull().unique())
          .addColumn('ipv6', 'text', (c) => c.notNull().unique())
          .addColumn('ip_index', 'bigint', (c) => c.notNull().unique())
          .addColumn('tags', 'text', (c) => c.notNull())
          .addColumn('ephemeral', 'integer', (c) => c.notNull())
          .addColumn('auth_key_id', 'text', (c) => c.notNull())
          .addColumn('hostname', 'text', (c) => c.notNull())
          .addColumn('os', 'text', (c) => c.notNull())
          .addColumn('version', 'text', (c) => c.notNull())
          .addColumn('endpoints', 'text', (c) => c.notNull())
          .addColumn('advertised_routes', 'text', (c) => c.notNull())
          .addColumn('approved_routes', 'text', (c) => c.notNull())
          .addColumn('created_at', 'bigint', (c) => c.notNull())
          .addColumn('last_seen', 'bigint')
          .addColumn('expires_at', 'bigint')
          .execute();
        await db.schema
          .createIndex('nodes_project_name')
          .on('nodes')
          .columns(['project', 'name'])
          .unique()
          .execute();
        await db.schema
          .createTable('policies')
          .addColumn('project', 'text', (c) => c.primaryKey().references('projects.name').onDelete('cascade'))
          .addColumn('source', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'bigint', (c) => c.notNull())
          .execute();
        await db.schema
          .createTable('desired_versions')
          .addColumn('project', 'text', (c) => c.notNull().references('projects.name').onDelete('cascade'))
          .addColumn('tag', 'text', (c) => c.notNull())
          .addColumn('version', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'bigint', (c) => c.notNull())
          .addPrimaryKeyConstraint('desired_versions_pk', ['project', 'tag'])
          .execute();
        await db.schema
          .createTable('audit_log')
          .$call((t) =>
            dialect === 'postgres'
              ? t.addColumn('id', 'serial', (c) => c.primaryKey())
              : t.addColumn('id', 'integer', (c) => c.primaryKey().autoIncrement()),
          )
          .addColumn('at', 'bigint', (c) => c.notNull())
          .addColumn('actor', 'text', (c) => c.notNull())
          .addColumn('action', 'text', (c) => c.notNull())
          .addColumn('target', 'text', (c) => c.notNull())
          .addColumn('detail', 'text', (c) => c.notNull())
          .execute();
      },
    },
    '0002_node_lockdown_ports': {
      async up(db: Kysely<unknown>) {
        await db.schema
          .alterTable('nodes')
          .addColumn('lockdown_ports', 'text', (c) => c.notNull().defaultTo('[]'))
          .execute();
      },
    },
    '0003_release_artifacts': {
      async up(db: Kysely<unknown>) {
        // Where the desired version's artifact is and whether newer nodes go back to it.
        await db.schema
          .alterTable('desired_versions')
          .addColumn('artifact_url', 'text', (c) => c.notNull().defaultTo(''))
          .execute();
        await db.schema
          .alterTable('desired_versions')
          .addColumn('sha256', 'text', (c) => c.notNull().defaultTo(''))
          .execute();
        await db.schema
          .alterTable('desired_versions')
          .addColumn('allow_downgrade', 'integer', (c) => c.notNull().defaultTo(0))
          .execute();
        await db.schema
          .alterTable('desired_versions')
          .addColumn('manifest', 'text', (c) => c.notNull().defaultTo(''))
          .execute();
      },
    },
    '0004_api_key_scopes': {
      async up(db: Kysely<unknown>) {
        // NULL keeps every existing key global. A JSON list rather than a
        // table with a foreign key: deleting a project must never empty a
        // key's list and so widen it to global.
        await db.schema.alterTable('api_keys').addColumn('projects', 'text').execute();
        await db.schema
          .alterTable('api_keys')
          .addColumn('read_only', 'integer', (c) => c.notNull().defaultTo(0))
          .execute();
      },
    },
    '0005_audit_project': {
      async up(db: Kysely<unknown>) {
        await db.schema.alterTable('audit_log').addColumn('project', 'text').execute();
        const fromDetail =
          dialect === 'postgres'
            ? sql`(detail::jsonb ->> 'project')`
            : sql`json_extract(detail, '$.project')`;
        await sql`update audit_log set project = ${fromDetail}`.execute(db);
        await sql`update audit_log set project = target
          where action like 'project.%' or action like 'policy.%' or action like 'version.%'`.execute(db);
        await db.schema
          .createIndex('audit_log_project_at')
          .on('audit_log')
          .columns(['project', 'at'])
          .execute();
        await db.schema.createIndex('audit_log_at').on('audit_log').column('at').execute();
      },
    },
    // Headscale's API addresses users (projects) and nodes by number; the
    // numbers come from counters that only go up, so none is ever reused.
    '0006_numeric_ids': {
      async up(db: Kysely<unknown>) {
        await db.schema.alterTable('projects').addColumn('numeric_id', 'bigint').execute();
        await db.schema.alterTable('nodes').addColumn('numeric_id', 'bigint').execute();
        await db.schema
          .createTable('id_counters')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('last', 'bigint', (c) => c.notNull())
          .execute();
        for (const [table, key] of [
          ['projects', 'name'],
          ['nodes', 'id'],
        ] as const) {
          const rows = await sql<{
            key: string;
          }>`select ${sql.ref(key)} as key from ${sql.table(table)} order by created_at, ${sql.ref(key)}`.execute(
            db,
          );
          let n = 0;
          for (const r of rows.rows) {
            n++;
            await sql`update ${sql.table(table)} set numeric_id = ${n} where ${sql.ref(key)} = ${r.key}`.execute(
              db,
            );
          }
          await sql`insert into id_counters (name, last) values (${table}, ${n})`.execute(db);
          await db.schema
            .createIndex(`${table}_numeric_id`)
            .on(table)
            .column('numeric_id')
            .unique()
            .execute();
        }
      },
    },
    // The one policy Headscale's API sets for all users: it applies to every
    // project that has no policy of its own.
    '0007_global_policy': {
      async up(db: Kysely<unknown>) {
        await db.schema
          .createTable('global_policy')
          .addColumn('id', 'integer', (c) => c.primaryKey())
          .addColumn('source', 'text', (c) => c.notNull())
          .addColumn('updated_at', 'bigint', (c) => c.notNull())
          .execute();
      },
    },
    '0008_unique_node_keys': {
      // Two nodes with one WireGuard key break every netmap of their project.
      // Older versions did not prevent it, and which holder is genuine cannot
      // be told afterwards: every holder is expired (an admin re-authorizes
      // it with a new auth key, and the agent registers with its own key) and
      // its key replaced by a unique placeholder, so the index can be built.
      async up(db: Kysely<unknown>) {
        const now = Date.now();
        const { rows } = await sql<{ id: string; project: string; name: string }>`
          select id, project, name from nodes where node_key in
            (select node_key from nodes group by node_key having count(*) > 1)`.execute(db);
        for (const r of rows) {
          await sql`update nodes set node_key = ${`duplicate:${r.id}`},
              expires_at = case when expires_at is not null and expires_at < ${now}
                then expires_at else ${now} end
            where id = ${r.id}`.execute(db);
          const detail = JSON.stringify({ project: r.project, name: r.name, reason: 'duplicate node key' });
          await sql`insert into audit_log (at, actor, action, target, detail, project)
            values (${now}, 'migration', 'node.expire', ${r.id}, ${detail}, ${r.project})`.execute(db);
        }
        await db.schema.createIndex('nodes_node_key').on('nodes').column('node_key').unique().execute();
      },
    },
    '0009_node_key_set_at': {
      // When each node's WireGuard key was set, and a per-project maximum key
      // age. Older versions did not record key changes: a node's creation is
      // the latest time its key is known to date from.
      async up(db: Kysely<unknown>) {
        await db.schema.alterTable('nodes').addColumn('key_set_at', 'bigint').execute();
        await sql`update nodes set key_set_at = created_at`.execute(db);
        await db.schema.alterTable('projects').addColumn('max_key_age_ms', 'bigint').execute();
      },
    },
    '0010_rollout_max_unavailable': {
      // How many nodes of a desired-version entry update at once; entries
      // set before rollouts existed update one node at a time.
      async up(db: Kysely<unknown>) {
        await db.schema
          .alterTable('desired_versions')
          .addColumn('max_unavailable', 'integer', (c) => c.notNull().defaultTo(1))
          .execute();
      },
    },
    // Several coordinators on one PostgreSQL database: a log of committed
    // changes (announced with NOTIFY, read back after a missed one), the
    // coordinators alive, which node streams to which, and leases for the
    // periodic jobs only one of them runs. Only new tables: a coordinator of
    // the previous version keeps working beside them during a rollout.
    '0011_replication': {
      async up(db: Kysely<unknown>) {
        await db.schema
          .createTable('changes')
          .$call((t) =>
            dialect === 'postgres'
              ? t.addColumn('seq', 'bigserial', (c) => c.primaryKey())
              : t.addColumn('seq', 'integer', (c) => c.primaryKey().autoIncrement()),
          )
          .addColumn('at', 'bigint', (c) => c.notNull())
          .addColumn('origin', 'text', (c) => c.notNull())
          .addColumn('kind', 'text', (c) => c.notNull())
          .addColumn('ref', 'text', (c) => c.notNull())
          .execute();
        await db.schema.createIndex('changes_at').on('changes').column('at').execute();
        // Where coordinators sharing the database look for the next free address.
        await sql`insert into id_counters (name, last)
          select 'addresses', coalesce(max(ip_index), 0) from nodes`.execute(db);
        await db.schema
          .createTable('replicas')
          .addColumn('id', 'text', (c) => c.primaryKey())
          .addColumn('started_at', 'bigint', (c) => c.notNull())
          .addColumn('expires_at', 'bigint', (c) => c.notNull())
          // Where the others reach its gRPC port to forward relay datagrams; '' if they cannot.
          .addColumn('address', 'text', (c) => c.notNull().defaultTo(''))
          .execute();
        // What coordinators present to each other (ReplicaService): whoever can read it can read the database.
        await db.schema
          .createTable('replica_secret')
          .addColumn('id', 'integer', (c) => c.primaryKey())
          .addColumn('secret', 'text', (c) => c.notNull())
          .execute();
        await db.schema
          .createTable('presence')
          .addColumn('node_id', 'text', (c) => c.notNull())
          .addColumn('replica', 'text', (c) => c.notNull())
          .addColumn('since', 'bigint', (c) => c.notNull())
          .addPrimaryKeyConstraint('presence_pk', ['node_id', 'replica'])
          .execute();
        await db.schema.createIndex('presence_replica').on('presence').column('replica').execute();
        await db.schema
          .createTable('leases')
          .addColumn('name', 'text', (c) => c.primaryKey())
          .addColumn('holder', 'text', (c) => c.notNull())
          .addColumn('expires_at', 'bigint', (c) => c.notNull())
          .execute();
      },
    },
  };
}

/** Runs every migration not run yet; `upTo` stops after that one (tests of upgrades). */
export async function migrate(db: Kysely<unknown>, dialect: Dialect, upTo?: string): Promise<void> {
  const provider: MigrationProvider = { getMigrations: async () => migrations(dialect) };
  const migrator = new Migrator({ db, provider });
  const { error, results } = await (upTo ? migrator.migrateTo(upTo) : migrator.migrateToLatest());
  if (error) {
    const failed = results?.find((r) => r.status === 'Error')?.migrationName ?? 'unknown';
    throw new Error(
      `database migration ${failed} failed: ${error instanceof Error ? error.message : String(error)}`,
    );
  }
}
