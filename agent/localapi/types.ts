// What the agent's local API answers; `meshgate status -o json` prints it as is.
export interface PeerStatus {
  id: string;
  name: string;
  ipAddresses: string[];
  tags: string[];
  online: boolean;
  /** Where WireGuard currently sends this peer's packets. */
  endpoint: string;
  lastHandshake: string;
  rxBytes: number;
  txBytes: number;
  version: string;
  lastSeen: string;
  /** How packets reach the peer: straight over UDP or through the coordinator's relay. */
  path: 'direct' | 'relay' | 'probing' | '';
}

export interface AgentStatus {
  self: {
    id: string;
    name: string;
    project: string;
    ipAddresses: string[];
    tags: string[];
    ephemeral: boolean;
    nodeKey: string;
  };
  version: string;
  desiredVersion: string;
  /**
   * Where the desired version is and how to check it, for an external
   * controller that installs it (docs/agent.md); null without one.
   */
  desiredRelease: {
    version: string;
    artifactUrl: string;
    sha256: string;
    manifest: string;
    allowDowngrade: boolean;
  } | null;
  /** --auto-update, and the last update this agent refused or rolled back (kept until the coordinator names another release). */
  selfUpdate: { enabled: boolean; failed: { version: string; reason: string } | null };
  /** The node's state and the one line that explains it (see agent/control/node-state.ts). */
  state: { kind: string; detail: string; message: string };
  coordinator: { url: string; state: string; error: string };
  interface: {
    name: string;
    /** Empty while down. */
    backend: string;
    listenPort: number;
    /** Whether the interface exists in the kernel right now. */
    present: boolean;
    /** Times it was found deleted and recreated. */
    restores: number;
    lastRestore: string;
  };
  /** Ports locked down in the kernel right now (not merely configured). */
  lockdownPorts: number[];
  firewall: {
    /** The nftables table in the kernel: as-applied, missing, changed, or absent (none meant to be). */
    kernel: string;
    /** --lockdown-ports when --lockdown-ssh is on, else []. */
    configuredPorts: number[];
    /** Times the table was found removed or changed and restored. */
    restores: number;
    lastRestore: string;
  };
  /** The mesh DNS responder: where it answers ('' when not), for which domain, registered with systemd-resolved. */
  dns: { address: string; domain: string; resolved: boolean };
  peers: PeerStatus[];
}
