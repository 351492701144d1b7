// Names that travel over the network: node, project, tag and group names are
// DNS labels so they can double as host names under the mesh domain.
const LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

export function isDnsLabel(name: string): boolean {
  return LABEL.test(name);
}

/** "Web_01.example.com" -> "web-01"; empty when nothing usable is left. */
export function toDnsLabel(hostname: string): string {
  const first = hostname.split('.')[0] ?? '';
  return first
    .toLowerCase()
    .replace(/[^a-z0-9-]+/g, '-')
    .replace(/^-+|-+$/g, '')
    .slice(0, 63)
    .replace(/-+$/, '');
}

export function isTag(tag: string): boolean {
  return tag.startsWith('tag:') && isDnsLabel(tag.slice(4));
}

/** Project names: DNS labels, or UUIDs as metal-stack uses them (also labels). */
export function isProjectName(name: string): boolean {
  return isDnsLabel(name);
}
