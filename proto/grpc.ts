// Bridges protobuf-es service descriptors to grpc-js, for the servers on the
// coordinator and for the clients in the agent and the CLI.
import {
  type DescMethod,
  type DescService,
  fromBinary,
  type MessageShape,
  toBinary,
} from '@bufbuild/protobuf';
import type { GenService } from '@bufbuild/protobuf/codegenv2';
import * as grpc from '@grpc/grpc-js';

const RAW = Symbol('raw request bytes');

/** The bytes a request arrived as, for signature checks over exactly what was sent. */
export function rawBytes(msg: object): Uint8Array {
  return (msg as { [RAW]?: Uint8Array })[RAW] ?? new Uint8Array();
}

/**
 * For clients of the coordinator: a full netmap is about 260 bytes per peer,
 * so grpc-js's default limit of 4 MiB would refuse it in a project of ~16,000
 * nodes, and a node listing of such a project too.
 */
/**
 * Trailer with a machine-readable cause of a refused agent call (`node-expired`, `node-unknown`):
 * the status code alone does not tell an expired node from a deleted one.
 */
export const REASON_TRAILER = 'meshgate-reason';

export const CLIENT_RECEIVE_LIMIT: grpc.ChannelOptions = { 'grpc.max_receive_message_length': 64 * 2 ** 20 };

export function methodPath(service: DescService, method: DescMethod): string {
  return `/${service.typeName}/${method.name}`;
}

export function serviceDefinition(service: DescService): grpc.ServiceDefinition {
  const def: Record<string, grpc.MethodDefinition<object, object>> = {};
  for (const m of service.methods) {
    def[m.localName] = {
      path: methodPath(service, m),
      requestStream: m.methodKind === 'client_streaming' || m.methodKind === 'bidi_streaming',
      responseStream: m.methodKind === 'server_streaming' || m.methodKind === 'bidi_streaming',
      requestSerialize: (msg: object) => Buffer.from(toBinary(m.input, msg as never)),
      requestDeserialize: (buf: Buffer) => {
        const msg = fromBinary(m.input, buf);
        Object.defineProperty(msg, RAW, { value: buf, enumerable: false });
        return msg;
      },
      // A server may send a response it encoded itself, e.g. one body shared by many streams.
      responseSerialize: (msg: object) =>
        msg instanceof Uint8Array
          ? Buffer.from(msg.buffer, msg.byteOffset, msg.byteLength)
          : Buffer.from(toBinary(m.output, msg as never)),
      responseDeserialize: (buf: Buffer) => fromBinary(m.output, buf),
    };
  }
  return def as grpc.ServiceDefinition;
}

// biome-ignore lint/suspicious/noExplicitAny: method shapes come from the descriptor
type AnyMethods = Record<string, any>;

/** Input and output types of one method of a generated service. */
export type In<S extends GenService<AnyMethods>, K extends keyof S['method']> = MessageShape<
  S['method'][K]['input']
>;
export type Out<S extends GenService<AnyMethods>, K extends keyof S['method']> = MessageShape<
  S['method'][K]['output']
>;

export function makeClient(
  service: DescService,
  target: string,
  credentials: grpc.ChannelCredentials,
  options: grpc.ChannelOptions = {},
): grpc.Client {
  const Ctor = grpc.makeGenericClientConstructor(serviceDefinition(service), service.typeName);
  return new Ctor(target, credentials, options);
}

/** A unary call as a promise. */
export function unary<S extends GenService<AnyMethods>, K extends keyof S['method'] & string>(
  client: grpc.Client,
  _service: S,
  method: K,
  request: In<S, K>,
  metadata = new grpc.Metadata(),
  options: grpc.CallOptions = {},
): Promise<Out<S, K>> {
  return new Promise((resolve, reject) => {
    // biome-ignore lint/suspicious/noExplicitAny: generic client methods are untyped
    (client as any)[method](request, metadata, options, (err: grpc.ServiceError | null, res: Out<S, K>) =>
      err ? reject(err) : resolve(res),
    );
  });
}
