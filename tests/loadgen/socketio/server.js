// The Socket.IO 4 peer of the sockets host, for the benchmark
// (scripts/bench.sh): the same jobs done the idiomatic Socket.IO way.
// - JWT (HS256) checked by a middleware from `auth.token`;
// - one room per user; `sendMessage` with an ack callback, pushed as
//   `message` to the recipient's room and the sender's other sockets,
//   after the same checks as the chat plugin (`to` another user, `text` of
//   1-4000 characters, recipient in the users file, student <-> consultant);
// - `POST /api/events` (service token) for PAYMENT_PROCESSED, with the
//   payments plugin's checks, the host's status codes and error bodies,
//   its 1 MiB body limit and its idempotency keys (10 minutes).
// Environment: SOCKETS_JWT_SECRET, SOCKETS_LISTEN (127.0.0.1:8090; port 0: any),
// SOCKETS_USERS_FILE (JSON array of {id, role}).
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const jwt = require('jsonwebtoken');
const { Server } = require('socket.io');

const secret = process.env.SOCKETS_JWT_SECRET;
if (!secret) throw new Error('SOCKETS_JWT_SECRET is required');
const [host, port] = (process.env.SOCKETS_LISTEN || '127.0.0.1:8090').split(':');
const users = new Map(
  JSON.parse(fs.readFileSync(process.env.SOCKETS_USERS_FILE || '/dev/null', 'utf8') || '[]')
    .map((user) => [user.id, user]),
);
const allowed = new Set(['student>consultant', 'consultant>student']);

function verify(token) {
  return jwt.verify(token, secret, { algorithms: ['HS256'] });
}

// More than 4000 characters (code points); a string's length counts UTF-16
// units, never fewer than its code points, so most texts need no count.
function tooLong(text) {
  return text.length > 4000 && [...text].length > 4000;
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

// PROTOCOL.md's HTTP error body; the code is fixed by the status.
const errorCodes = {
  400: 'bad_request', 401: 'unauthorized', 403: 'forbidden', 404: 'not_found',
  413: 'too_large', 422: 'unknown_event',
};
function fail(res, status, message) {
  json(res, status, { error: { code: errorCodes[status] || 'bad_request', message } });
}

const bodyLimit = 1 << 20;
const tooLarge = (res) => fail(res, 413, 'the body is over 1 MiB');
const eventName = /^[A-Za-z0-9_.:-]{1,64}$/;

// Idempotency keys answered in the last 10 minutes, oldest first (a Map
// keeps insertion order, so expired keys are pruned from its front).
const rememberFor = 10 * 60 * 1000;
const answered = new Map();
function remembered(id) {
  const now = Date.now();
  for (const [key, entry] of answered) {
    if (now - entry.at < rememberFor) break;
    answered.delete(key);
  }
  return answered.get(id);
}

// The payments plugin's checks: the required ids, and the listed optional
// fields of the right type when present (null counts as absent).
function validPayment(p) {
  const optional = (value, type) => value == null || typeof value === type;
  return p !== null && typeof p === 'object' && !Array.isArray(p)
    && typeof p.paymentId === 'string' && p.paymentId !== ''
    && typeof p.studentId === 'string' && p.studentId !== ''
    && optional(p.consultantId, 'string') && optional(p.currency, 'string')
    && optional(p.status, 'string') && optional(p.amount, 'number');
}

const server = http.createServer((req, res) => {
  if (req.url.split('?')[0] !== '/api/events') return fail(res, 404, 'no such route');
  if (req.method !== 'POST') return fail(res, 405, 'method not allowed');
  let claims;
  try {
    claims = verify((req.headers.authorization || '').replace(/^Bearer /i, ''));
  } catch {
    return fail(res, 401, 'missing or invalid token');
  }
  if (claims.role !== 'service') return fail(res, 403, 'the service role is required');
  if (Number(req.headers['content-length']) > bodyLimit) {
    req.resume();
    return tooLarge(res);
  }
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size <= bodyLimit) chunks.push(chunk);
  });
  req.on('end', () => {
    if (size > bodyLimit) return tooLarge(res);
    let event;
    try {
      event = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch {
      return fail(res, 400, 'the body is not JSON');
    }
    if (event === null || typeof event !== 'object' || Array.isArray(event)
        || typeof event.event !== 'string' || !eventName.test(event.event)
        || (event.id != null && (typeof event.id !== 'string' || event.id === ''))) {
      return fail(res, 400, 'not an event');
    }
    // As the host: a remembered key is answered before any plugin runs.
    const earlier = event.id != null && remembered(event.id);
    if (earlier) return json(res, 202, { ...earlier.reply, duplicate: true });
    if (event.event !== 'PAYMENT_PROCESSED') return fail(res, 422, 'no plugin handles the event');
    const p = event.data;
    if (!validPayment(p)) return fail(res, 400, 'not a valid PAYMENT_PROCESSED');
    io.to(p.studentId).emit('paymentProcessed', {
      paymentId: p.paymentId, amount: p.amount, currency: p.currency,
      status: p.status, consultantId: p.consultantId,
    });
    // The payments plugin addresses one user, the student, online or not.
    const reply = { id: event.id || crypto.randomUUID(), recipients: 1 };
    if (event.id != null) answered.set(event.id, { reply, at: Date.now() });
    json(res, 202, reply);
  });
});

const io = new Server(server, { serveClient: false, transports: ['websocket'], perMessageDeflate: false });

io.use((socket, next) => {
  try {
    const claims = verify(socket.handshake.auth && socket.handshake.auth.token);
    socket.data.user = claims.sub;
    socket.data.role = claims.role || 'user';
    next();
  } catch {
    next(new Error('unauthorized'));
  }
});

io.on('connection', (socket) => {
  socket.join(socket.data.user);
  socket.on('sendMessage', (data, ack) => {
    const reply = typeof ack === 'function' ? ack : () => {};
    if (!data || typeof data.to !== 'string' || !data.to || data.to === socket.data.user
        || typeof data.text !== 'string' || !data.text || tooLong(data.text)) {
      return reply({ ok: false, error: { code: 'bad_request' } });
    }
    const recipient = users.get(data.to);
    if (!recipient) return reply({ ok: false, error: { code: 'not_found' } });
    if (!allowed.has(`${socket.data.role}>${recipient.role}`)) {
      return reply({ ok: false, error: { code: 'forbidden' } });
    }
    const message = {
      messageId: crypto.randomUUID(), from: socket.data.user, fromRole: socket.data.role,
      to: data.to, text: data.text, sentAt: new Date().toISOString(),
    };
    io.to(data.to).emit('message', message);
    socket.to(socket.data.user).emit('message', message);
    const room = io.sockets.adapter.rooms.get(data.to);
    reply({ ok: true, data: { messageId: message.messageId, delivered: room ? room.size : 0 } });
  });
});

// Port 0 picks a free port: the line says the one taken (the tests read it).
server.listen(Number(port), host, () => {
  console.log(`socket.io listening on http://${host}:${server.address().port}`);
});
