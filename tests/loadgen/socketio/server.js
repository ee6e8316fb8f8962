// The Socket.IO 4 peer of the sockets host, for the benchmark
// (scripts/bench.sh): the same jobs done the idiomatic Socket.IO way.
// - JWT (HS256) checked by a middleware from `auth.token`;
// - one room per user; `sendMessage` with an ack callback, pushed as
//   `message` to the recipient's room and the sender's other sockets,
//   after the same checks as the chat plugin (`to` another user, `text` of
//   1-4000 characters, recipient in the users file, student <-> consultant);
// - `POST /api/events` (service token) for PAYMENT_PROCESSED, with the
//   payments plugin's checks and the host's status codes.
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
  if (req.method !== 'POST' || req.url !== '/api/events') {
    return json(res, 404, { error: { code: 'not_found' } });
  }
  let claims;
  try {
    claims = verify((req.headers.authorization || '').replace(/^Bearer /i, ''));
  } catch {
    return json(res, 401, { error: { code: 'unauthorized' } });
  }
  if (claims.role !== 'service') return json(res, 403, { error: { code: 'forbidden' } });
  let body = '';
  req.on('data', (chunk) => { body += chunk; });
  req.on('end', () => {
    let event;
    try {
      event = JSON.parse(body);
    } catch {
      return json(res, 400, { error: { code: 'bad_request' } });
    }
    if (event === null || typeof event !== 'object' || typeof event.event !== 'string') {
      return json(res, 400, { error: { code: 'bad_request' } });
    }
    if (event.event !== 'PAYMENT_PROCESSED') return json(res, 422, { error: { code: 'unknown_event' } });
    const p = event.data;
    if (!validPayment(p)) return json(res, 400, { error: { code: 'bad_request' } });
    io.to(p.studentId).emit('paymentProcessed', {
      paymentId: p.paymentId, amount: p.amount, currency: p.currency,
      status: p.status, consultantId: p.consultantId,
    });
    json(res, 202, { id: event.id || crypto.randomUUID(), recipients: 1 });
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
