// Structured logs. Fields that could ever hold a secret are redacted at the
// logger, so a careless log call cannot leak one.
import pino, { type Logger } from 'pino';

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino(
    {
      level,
      base: { svc: 'meshgate-coordinator' },
      redact: {
        paths: [
          'authKey',
          'auth_key',
          'key',
          'apiKey',
          'authorization',
          '*.authKey',
          '*.key',
          '*.authorization',
          'req.headers.authorization',
        ],
        censor: '[redacted]',
      },
    },
    destination ?? pino.destination(2),
  );
}

export type { Logger };
