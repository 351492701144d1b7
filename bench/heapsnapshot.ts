// What grew between two V8 heap snapshots of the coordinator (bench/coordinator.ts
// --heap-snapshot DIR writes one before the agents register and one after they
// connected): self size and count per kind of object, per agent.
//
//   node --import tsx bench/heapsnapshot.ts BEFORE.heapsnapshot AFTER.heapsnapshot --agents 1000 [--top 25] [--json]
//
// Native objects that Node reports to V8 (TLS connections, HTTP/2 sessions and
// nghttp2's memory, buffers) appear as "Node / …" entries with their sizes, so
// the table covers more than the JavaScript heap. Retained sizes are not
// computed: the self sizes of the kinds that grew add up to the growth.
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

interface Snapshot {
  snapshot: { meta: { node_fields: string[]; node_types: [string[], ...unknown[]] } };
  nodes: number[];
  strings: string[];
}

export interface Kind {
  kind: string;
  count: number;
  bytes: number;
}

/** Self size and count per kind: constructor name for objects, the node type for the rest. */
export function kinds(file: string): Map<string, Kind> {
  const s = JSON.parse(readFileSync(file, 'utf8')) as Snapshot;
  const fields = s.snapshot.meta.node_fields;
  const types = s.snapshot.meta.node_types[0];
  const width = fields.length;
  const typeAt = fields.indexOf('type');
  const nameAt = fields.indexOf('name');
  const sizeAt = fields.indexOf('self_size');
  const out = new Map<string, Kind>();
  for (let i = 0; i < s.nodes.length; i += width) {
    const type = types[s.nodes[i + typeAt]!]!;
    const name = s.strings[s.nodes[i + nameAt]!]!;
    // Objects and native objects by name; strings, code, arrays and the like by type.
    const kind =
      type === 'object' || type === 'native' || type === 'closure'
        ? `${type === 'closure' ? 'closure ' : ''}${name.slice(0, 80)}`
        : `(${type})`;
    const k = out.get(kind) ?? { kind, count: 0, bytes: 0 };
    k.count++;
    k.bytes += s.nodes[i + sizeAt]!;
    out.set(kind, k);
  }
  return out;
}

/** Kinds that grew, largest growth first. */
export function growth(before: Map<string, Kind>, after: Map<string, Kind>): Kind[] {
  const out: Kind[] = [];
  for (const [kind, a] of after) {
    const b = before.get(kind) ?? { count: 0, bytes: 0 };
    out.push({ kind, count: a.count - b.count, bytes: a.bytes - b.bytes });
  }
  return out.sort((x, y) => y.bytes - x.bytes);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      agents: { type: 'string', default: '1' },
      top: { type: 'string', default: '25' },
      json: { type: 'boolean', default: false },
    },
  });
  if (positionals.length !== 2) {
    process.stderr.write(
      'usage: node --import tsx bench/heapsnapshot.ts BEFORE.heapsnapshot AFTER.heapsnapshot --agents N [--top 25] [--json]\n',
    );
    process.exit(2);
  }
  const n = Number(values.agents);
  const rows = growth(kinds(positionals[0]!), kinds(positionals[1]!));
  const total = rows.reduce((s, r) => s + r.bytes, 0);
  const top = rows.slice(0, Number(values.top));
  if (values.json) {
    process.stdout.write(`${JSON.stringify({ agents: n, totalBytes: total, top })}\n`);
  } else {
    process.stdout.write(`growth ${(total / n / 1024).toFixed(1)} KiB per agent (${n} agents)\n`);
    process.stdout.write('  KiB/agent  objects/agent  kind\n');
    for (const r of top)
      process.stdout.write(
        `  ${(r.bytes / n / 1024).toFixed(2).padStart(9)}  ${(r.count / n).toFixed(1).padStart(13)}  ${r.kind}\n`,
      );
  }
}
