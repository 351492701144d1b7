// The operator of the local API: a non-root user (or group) that may read the
// agent's status, which is what `meshgate status`, `ping` and `ssh` need. It
// gets a socket of its own, owned by it; the root socket stays 0600, so
// down, up and logout remain root's.
import { execFileSync } from 'node:child_process';

export class OperatorError extends Error {
  override name = 'OperatorError';
}

/** Who may open the operator socket: a user (socket 0600, theirs) or a group (0660, root:group). */
export type Operator =
  | { kind: 'user'; name: string; uid: number; gid: number }
  | { kind: 'group'; name: string; gid: number };

/** The operator socket next to the agent's socket: agent.sock -> agent.operator.sock. */
export function operatorSocketPath(socket: string): string {
  return socket.endsWith('.sock')
    ? `${socket.slice(0, -'.sock'.length)}.operator.sock`
    : `${socket}.operator`;
}

/** One entry of the user or group database (NSS, so LDAP users work too), or null. */
function getent(db: 'passwd' | 'group', key: string): string[] | null {
  try {
    return execFileSync('getent', [db, key], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] })
      .split('\n')[0]!
      .split(':');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT')
      throw new OperatorError(
        'getent not found: it looks up the --operator user or group (install libc-bin)',
      );
    return null;
  }
}

/** "USER" or ":GROUP" (as chown writes them), by name or number. */
export function resolveOperator(spec: string): Operator {
  const isGroup = spec.startsWith(':');
  const name = isGroup ? spec.slice(1) : spec;
  if (!/^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?$/.test(name))
    throw new OperatorError(`--operator: "${spec}" is not a user name, or :group for a group`);
  if (isGroup) {
    const entry = getent('group', name);
    if (!entry) throw new OperatorError(`--operator: no group "${name}" on this host`);
    const gid = Number(entry[2]);
    if (gid === 0) throw new OperatorError('--operator: the root group has the agent socket already');
    return { kind: 'group', name: entry[0]!, gid };
  }
  const entry = getent('passwd', name);
  if (!entry) throw new OperatorError(`--operator: no user "${name}" on this host (use :NAME for a group)`);
  const uid = Number(entry[2]);
  if (uid === 0)
    throw new OperatorError('--operator: root has the agent socket already; name a non-root user');
  return { kind: 'user', name: entry[0]!, uid, gid: Number(entry[3]) };
}
