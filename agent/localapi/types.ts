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
  coordinator: { url: string; state: string; error: string };
  interface: { name: string; backend: string; listenPort: number };
  lockdownPorts: number[];
  peers: PeerStatus[];
}
