import { z } from 'zod';
import { quote } from '../../proto/text.js';

/** Objects reject unknown keys and name the ones they allow, so a typo gets an answer. */
function strict<T extends z.ZodRawShape>(shape: T) {
  const allowed = Object.keys(shape).join(', ');
  return z.strictObject(shape, {
    error: (issue) =>
      issue.code === 'unrecognized_keys'
        ? `unknown key ${quote(String(issue.keys[0]))} (allowed: ${allowed})`
        : undefined,
  });
}

const nonEmpty = { error: 'must not be empty' };
const strings = z.array(z.string());

/** The shape of a policy document; names, selectors, ports and addresses are checked by `resolve`. */
export const policyDocument = strict({
  groups: z.record(z.string(), strings).optional(),
  tagOwners: z.record(z.string(), strings).optional(),
  hosts: z.record(z.string(), z.string()).optional(),
  acls: z
    .array(
      strict({
        action: z.literal('accept', { error: 'the only action is "accept"; what no rule accepts is denied' }),
        src: strings.min(1, nonEmpty),
        dst: strings.min(1, nonEmpty),
        proto: z.enum(['tcp', 'udp', 'icmp'], { error: 'proto is one of "tcp", "udp", "icmp"' }).optional(),
      }),
    )
    .optional(),
  tests: z
    .array(
      strict({
        src: z.string(),
        accept: strings.optional(),
        deny: strings.optional(),
      }),
    )
    .optional(),
});

export type PolicyDocument = z.infer<typeof policyDocument>;
