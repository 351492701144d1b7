// Whether a process, known only by its id, still runs: for processes this
// one did not start or no longer holds a handle of (an agent of another
// release, an adopted wireguard-go).

/** Signal 0 checks that the process exists without touching it. */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
