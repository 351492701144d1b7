// The userspace node as a library: `import { joinMesh } from 'meshgate/userspace'`.
export { type JoinOptions, joinMesh, Mesh, MeshError, type MeshPeer } from './node.js';
