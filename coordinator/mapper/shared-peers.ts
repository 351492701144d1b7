// The peers of a full netmap for agents that take them shared (proto/netmap.ts
// SHARED_PEERS). Without a policy, every node of a project sees every other:
// 10,000 full netmaps of 1.6 MB each, 16 GB to connect one project, and
// compressing each of them (every one differs by its own node) cost more CPU
// than the bytes it saved. A group's peers, the node itself included, are
// the same for every member, so they are compressed once and every member
// gets the same bytes.
//
// Presence and endpoints change all the time while agents connect; compressing
// again for each change would be the per-recipient cost once more. A block
// therefore stays while the peers that changed since it was compressed are few:
// those go along uncompressed and replace their stale copies.
import type { CompiledPolicy, PeerGroup } from '../policy/index.js';
import { deflate } from './wire.js';

/**
 * The peers that changed since compression may add this share of the
 * compressed size to each netmap before the block is compressed again. At
 * 10,000 peers that is about one new block per 1,000 changes.
 */
const STALE_SHARE = 1 / 8;

export interface SharedPeers {
  /** The group's peers, compressed. */
  readonly bytes: Uint8Array;
  /** Members whose peer changed since: send them along. */
  readonly stale: ReadonlySet<string>;
}

interface Block extends SharedPeers {
  readonly members: ReadonlySet<string>;
  readonly stale: Set<string>;
  /** Uncompressed bytes per member, to weigh the stale ones. */
  readonly peerBytes: number;
}

interface ProjectBlocks {
  /** The policy the groups come from: the blocks hold its member sets. */
  compiled: CompiledPolicy;
  groups: Map<string, Block>;
}

export class SharedPeerBlocks {
  private readonly projects = new Map<string, ProjectBlocks>();

  /**
   * The compressed peers of `group`. `encode` gives the encoded NetMap field
   * of each member's peer in the shared form (undefined for a node that is
   * gone), already encoded where the mapper had it.
   */
  get(
    project: string,
    compiled: CompiledPolicy,
    group: PeerGroup,
    encode: (ids: string[]) => Uint8Array,
  ): SharedPeers {
    let p = this.projects.get(project);
    if (!p || p.compiled !== compiled) {
      p = { compiled, groups: new Map() };
      this.projects.set(project, p);
    }
    const block = p.groups.get(group.key);
    if (block && block.stale.size * block.peerBytes <= block.bytes.length * STALE_SHARE) return block;
    const members = group.members();
    const raw = encode(members);
    const fresh: Block = {
      bytes: deflate(raw),
      members: new Set(members),
      stale: new Set(),
      peerBytes: members.length ? raw.length / members.length : 0,
    };
    p.groups.set(group.key, fresh);
    return fresh;
  }

  /** The node's peer changed without changing who sees whom (presence, endpoints). */
  patched(project: string, nodeId: string): void {
    const p = this.projects.get(project);
    if (!p) return;
    for (const block of p.groups.values()) if (block.members.has(nodeId)) block.stale.add(nodeId);
  }

  /** Nobody of the project is connected: its blocks would only hold memory. */
  forget(project: string): void {
    this.projects.delete(project);
  }
}
