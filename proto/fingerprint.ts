// The SPKI SHA-256 fingerprint by which agents and the CLI pin the coordinator.
import { createHash, createPublicKey } from 'node:crypto';

export function spkiOf(certPem: string | Buffer): string {
  const spki = createPublicKey(certPem).export({ type: 'spki', format: 'der' });
  return `sha256:${createHash('sha256').update(spki).digest('hex')}`;
}
