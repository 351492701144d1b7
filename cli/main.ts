// The `meshgate` command: coordinator, agent and admin commands in one.
import { Command, CommanderError } from 'commander';
import { escapeUnsafe } from '../proto/text.js';
import { versionLine } from '../release/version.js';
import { registerAdminCommands } from './commands/admin.js';
import { registerAgentCommand } from './commands/agent.js';
import { registerCoordinatorCommands } from './commands/coordinator.js';
import { registerLocalCommands } from './commands/local.js';
import { registerReleaseCommands } from './commands/release.js';
import { registerUserspaceCommands } from './commands/userspace.js';
import { describeError } from './errors.js';

export function buildProgram(): Command {
  const program = new Command('meshgate')
    .description('WireGuard mesh that replaces open management ports in a data center')
    .option('-V, --version', 'print the version, git commit and Node version')
    .showHelpAfterError('(run with --help for usage)')
    .enablePositionalOptions()
    .exitOverride()
    .action((o: { version?: boolean }) => {
      if (!o.version) program.help();
      process.stdout.write(`${versionLine()}\n`);
    });
  registerCoordinatorCommands(program);
  registerAdminCommands(program);
  registerAgentCommand(program);
  registerLocalCommands(program);
  registerUserspaceCommands(program);
  registerReleaseCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  try {
    await buildProgram().parseAsync(argv, { from: 'user' });
    return typeof process.exitCode === 'number' ? process.exitCode : 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode;
    // A message may quote what a coordinator or an agent sent: it must not steer the terminal.
    process.stderr.write(`meshgate: ${escapeUnsafe(describeError(err, process.env.MESHGATE_COORDINATOR))}\n`);
    return 1;
  }
}

process.exitCode = await main(process.argv.slice(2));
