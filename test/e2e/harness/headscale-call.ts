// One call of Headscale's gRPC API, for tests that must make it from inside
// a network namespace: `node --import tsx headscale-call.ts HOST:PORT METHOD
// JSON`, the API key on stdin (never in argv). Prints the response as JSON;
// on a gRPC error prints {"code","details"} and exits 1.
import { readFileSync } from 'node:fs';
import { fromJson, type JsonValue, toJson } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import { HeadscaleService } from '../../../proto/gen/headscale/v1/headscale_pb.js';
import { makeClient, unary } from '../../../proto/grpc.js';

const [target, name, body] = process.argv.slice(2);
const method = HeadscaleService.methods.find((m) => m.name === name);
if (!target || !method) {
  process.stderr.write('usage: headscale-call.ts HOST:PORT METHOD JSON < api-key\n');
  process.exit(2);
}
const apiKey = readFileSync(0, 'utf8').trim();
const client = makeClient(HeadscaleService, target, grpc.credentials.createInsecure());
const md = new grpc.Metadata();
md.set('authorization', `Bearer ${apiKey}`);
try {
  const req = fromJson(method.input, JSON.parse(body ?? '{}') as JsonValue);
  const res = await unary(client, HeadscaleService, method.localName as never, req as never, md, {
    deadline: Date.now() + 10_000,
  });
  process.stdout.write(`${JSON.stringify(toJson(method.output, res as never))}\n`);
} catch (err) {
  const e = err as grpc.ServiceError;
  process.stdout.write(`${JSON.stringify({ code: e.code, details: e.details })}\n`);
  process.exitCode = 1;
} finally {
  client.close();
}
