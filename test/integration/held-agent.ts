// A simulated agent in a process of its own, so that a test can freeze it
// (SIGSTOP) like a host that vanished without closing its TCP connection.
// Usage: held-agent.ts URL FINGERPRINT AUTH_KEY HOSTNAME; prints "ready NODE_ID".
import { SimAgent } from './harness.js';

const [url, fingerprint, authKey, hostname] = process.argv.slice(2) as [string, string, string, string];
const agent = new SimAgent(url, fingerprint);
await agent.register(authKey, hostname);
await agent.connect();
process.stdout.write(`ready ${agent.id}\n`);
