// Interface names end up in `ip` arguments, socket paths and nftables scripts; Linux allows at most
// 15 bytes, and this character set keeps them harmless in all three places.
const IFNAME = /^[A-Za-z0-9_.-]{1,15}$/;

export class InvalidInterfaceNameError extends Error {
  constructor(readonly input: string) {
    super(`invalid interface name ${JSON.stringify(input.slice(0, 40))}: use 1-15 of A-Z a-z 0-9 _ . -`);
    this.name = 'InvalidInterfaceNameError';
  }
}

export function assertInterfaceName(name: string): string {
  if (!IFNAME.test(name) || name === '.' || name === '..') throw new InvalidInterfaceNameError(name);
  return name;
}
