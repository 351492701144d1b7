import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';

const deploy = join(import.meta.dirname, '..', '..', 'deploy');

describe('install.sh', () => {
  const script = readFileSync(join(deploy, 'install.sh'), 'utf8');

  it('writes the same unit as deploy/meshgate-agent.service', () => {
    // install.sh carries the unit inside itself so that it works piped into sh.
    const m = /<<UNIT\n([\s\S]*?)\nUNIT\n/.exec(script);
    assert.ok(m, 'install.sh has a UNIT here-document');
    const unit = m[1]!
      .replace('$bin_dir', '/usr/local/bin')
      .replace('$config', '/etc/meshgate/agent.yaml')
      .replace('$opt_dir', '/opt/meshgate');
    assert.equal(`${unit}\n`, readFileSync(join(deploy, 'meshgate-agent.service'), 'utf8'));
  });

  it('reads no file beside itself', () => {
    assert.doesNotMatch(script, /dirname "\$0"|\$\(dirname/);
  });
});
