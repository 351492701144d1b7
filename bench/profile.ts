// Prints where a coordinator CPU profile spent its time:
//   node --import tsx bench/profile.ts PROFILE.cpuprofile [--top 20] [--last SECONDS] [--json]
import { parseArgs } from 'node:util';
import { formatProfile, summarizeProfile } from './lib/profile.js';

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    top: { type: 'string', default: '15' },
    last: { type: 'string' },
    json: { type: 'boolean', default: false },
  },
});
if (!positionals.length) {
  process.stderr.write(
    'usage: node --import tsx bench/profile.ts FILE.cpuprofile [--top N] [--last SECONDS] [--json]\n',
  );
  process.exit(2);
}
for (const file of positionals) {
  const last = values.last === undefined ? undefined : Number(values.last) * 1000;
  const s = summarizeProfile(file, Number(values.top), last);
  process.stdout.write(values.json ? `${JSON.stringify(s)}\n` : `${file}\n${formatProfile(s)}\n`);
}
