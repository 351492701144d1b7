// Loads the rendered table into the kernel through `nft -f -`, one transaction per call.
import { run } from '../dataplane/exec.js';
import { type FirewallSpec, renderFirewall, renderRemoval } from './render.js';

export interface NftOptions {
  netns?: string;
}

/** Replaces the meshgate table with one built from `spec`; on error the previous table stays. */
export async function applyFirewall(spec: FirewallSpec, options: NftOptions = {}): Promise<void> {
  await run('nft', ['-f', '-'], { input: renderFirewall(spec), netns: options.netns });
}

/** Removes the meshgate table; succeeds when there is none. */
export async function removeFirewall(options: NftOptions = {}): Promise<void> {
  await run('nft', ['-f', '-'], { input: renderRemoval(), netns: options.netns });
}
