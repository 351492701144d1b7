// Versioned schema migrations, run at start. Never edit a released
// migration: add a new one.
import { type Kysely, type Migration, type MigrationProvider, Migrator, sql } from 'kysely';

export type Dialect = 'sqlite' | 'postgres';

function migrations(dialect: Dialect): Record<string, Migration> {
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
    '0002_unique_node_keys': {
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
          await sql`insert into audit_log (at, actor, action, target, detail)
            values (${now}, 'migration', 'node.expire', ${r.id}, ${detail})`.execute(db);
        }
        await db.schema.createIndex('nodes_node_key').on('nodes').column('node_key').unique().execute();
      },
    },
  };
}

export async function migrate(db: Kysely<unknown>, dialect: Dialect): Promise<void> {
  const provider: MigrationProvider = { getMigrations: async () => migrations(dialect) };
  const { error, results } = await new Migrator({ db, provider }).migrateToLatest();
  if (error) {
    const failed = results?.find((r) => r.status === 'Error')?.migrationName ?? 'unknown';
    throw new Error(
      `database migration ${failed} failed: ${error instanceof Error ? error.message : String(error)}`,
    );
  }
}
