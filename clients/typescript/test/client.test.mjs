// The client against the real host: the debug binary and the bundled
// plugins that `scripts/test.sh` built (SOCKETS_HOST_BIN overrides the
// binary). Every server binds 127.0.0.1.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

import { SocketsClient, SocketsError } from "../src/index.js";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
const hostBinary = process.env.SOCKETS_HOST_BIN ?? path.join(root, "target/debug/sockets-host");
const pluginsDir = path.join(root, "target/plugins/wasm32-wasip2/release");
const SECRET = "client-tests-secret-0123456789abcdef";

/** An HS256 token for `sub` with `role`, expiring `ttl` seconds from now. */
function token(sub, role, ttl = 3600, secret = SECRET) {
  const encode = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${encode({ alg: "HS256", typ: "JWT" })}.${encode({ sub, role, iat: now, exp: now + ttl })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/** Starts the host; resolves once it listens. */
async function startHost({ port = 0, dataDir } = {}) {
  const dir = dataDir ?? mkdtempSync(path.join(tmpdir(), "client-test-"));
  const child = spawn(hostBinary, ["serve"], {
    env: {
      PATH: process.env.PATH,
      SOCKETS_LISTEN: `127.0.0.1:${port}`,
      SOCKETS_JWT_SECRET: SECRET,
      SOCKETS_JWT_LEEWAY: "0",
      SOCKETS_DATA_DIR: dir,
      SOCKETS_PLUGINS_DIR: pluginsDir,
      SOCKETS_RATE_LIMIT: "0",
      SOCKETS_LOG: "warn",
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  const listening = await new Promise((resolve, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`the host did not start:\n${log}`)), 60_000);
    child.stdout.on("data", (chunk) => {
      out += chunk;
      const found = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (found) {
        clearTimeout(timer);
        resolve(Number(found[1]));
      }
    });
    child.on("exit", (code) => reject(new Error(`the host exited (${code}):\n${log}`)));
  });
  return {
    port: listening,
    dataDir: dir,
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((resolve) => child.on("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** Publishes a payment for s_1; resolves once the host took it (202). */
async function publish(port, paymentId) {
  const response = await fetch(`http://127.0.0.1:${port}/api/events`, {
    method: "POST",
    headers: { authorization: `Bearer ${token("billing", "service")}`, "content-type": "application/json" },
    body: JSON.stringify({ event: "PAYMENT_PROCESSED", data: { paymentId, studentId: "s_1", amount: 1 } }),
  });
  assert.equal(response.status, 202, await response.text());
}

/** A TCP proxy in front of the host whose connections can be cut. */
async function proxyTo(port) {
  const sockets = new Set();
  const proxy = { refusing: false };
  const server = net.createServer((client) => {
    if (proxy.refusing) return client.destroy();
    const upstream = net.connect(port, "127.0.0.1");
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on("close", () => sockets.delete(socket));
      socket.on("error", () => {});
    }
    client.pipe(upstream).pipe(client);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  proxy.port = server.address().port;
  proxy.cut = () => sockets.forEach((socket) => socket.destroy());
  proxy.close = () => {
    proxy.cut();
    server.close();
  };
  return proxy;
}

/** Resolves once `check()` is true; fails after `ms`. */
async function until(what, check, ms = 15_000) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

function client(url, options = {}) {
  const sockets = new SocketsClient({ url, token: () => token("s_1", "student"), WebSocket, reconnectDelayMs: 100, ...options });
  const payments = [];
  const states = [];
  sockets.on("paymentProcessed", (data, push) => payments.push({ paymentId: data.paymentId, id: push.id }));
  sockets.onState((state) => states.push(state));
  return { sockets, payments, states };
}

const ids = (from, to) => Array.from({ length: to - from }, (_, n) => `p${from + n}`);

test("pushes across a dropped TCP connection arrive exactly once and in order", async () => {
  const host = await startHost();
  const proxy = await proxyTo(host.port);
  const { sockets, payments, states } = client(`ws://127.0.0.1:${proxy.port}/ws`);
  try {
    sockets.start();
    await until("connected", () => sockets.state.state === "connected");
    for (const id of ids(0, 5)) await publish(host.port, id);
    await until("5 pushes", () => payments.length === 5);

    proxy.refusing = true;
    proxy.cut();
    await until("disconnected", () => sockets.state.state !== "connected");
    for (const id of ids(5, 10)) await publish(host.port, id);
    proxy.refusing = false;
    await until("connected again", () => sockets.state.state === "connected");
    for (const id of ids(10, 15)) await publish(host.port, id);
    await until("15 pushes", () => payments.length >= 15);
    await new Promise((resolve) => setTimeout(resolve, 300));

    assert.deepEqual(payments.map((push) => push.paymentId), ids(0, 15));
    assert.equal(new Set(payments.map((push) => push.id)).size, 15);
    const dropped = states.find((state) => state.state === "disconnected");
    assert.equal(dropped.willRetry, true);
  } finally {
    sockets.stop();
    proxy.close();
    await host.stop();
  }
});

test("a client that had no push yet gets what was sent while it was away", async () => {
  const host = await startHost();
  const proxy = await proxyTo(host.port);
  const { sockets, payments } = client(`ws://127.0.0.1:${proxy.port}/ws`);
  try {
    sockets.start();
    await until("connected", () => sockets.state.state === "connected");
    proxy.refusing = true;
    proxy.cut();
    await until("disconnected", () => sockets.state.state !== "connected");
    for (const id of ids(0, 3)) await publish(host.port, id);
    proxy.refusing = false;
    await until("connected again", () => sockets.state.state === "connected");
    await until("3 pushes", () => payments.length >= 3);
    assert.deepEqual(payments.map((push) => push.paymentId), ids(0, 3));
  } finally {
    sockets.stop();
    proxy.close();
    await host.stop();
  }
});

test("an ephemeral push is no resume cursor: what was sent while away still arrives", async () => {
  const host = await startHost();
  const proxy = await proxyTo(host.port);
  const { sockets, payments } = client(`ws://127.0.0.1:${proxy.port}/ws`);
  const typing = [];
  const failed = [];
  sockets.on("typing", (data, push) => typing.push(push));
  sockets.on("resumeFailed", (data) => failed.push(data));
  const consultant = new SocketsClient({
    url: `ws://127.0.0.1:${host.port}/ws`,
    token: () => token("c_1", "consultant"),
    WebSocket,
  });
  try {
    sockets.start();
    consultant.start();
    await until("both connected", () => sockets.state.state === "connected" && consultant.state.state === "connected");
    // The only push before the drop is ephemeral.
    assert.deepEqual(await consultant.emit("typing", { to: "s_1" }), { delivered: 1 });
    await until("typing shown", () => typing.length === 1);
    assert.equal(typing[0].ephemeral, true);
    assert.deepEqual(typing[0].data, { from: "c_1" });

    proxy.refusing = true;
    proxy.cut();
    await until("disconnected", () => sockets.state.state !== "connected");
    await publish(host.port, "p_away");
    proxy.refusing = false;
    await until("connected again", () => sockets.state.state === "connected");
    await until("the payment sent while away", () => payments.length >= 1);
    assert.deepEqual(payments.map((push) => push.paymentId), ["p_away"]);
    assert.deepEqual(failed, []);
    assert.equal(typing.length, 1, "an ephemeral push is never replayed");
  } finally {
    sockets.stop();
    consultant.stop();
    proxy.close();
    await host.stop();
  }
});

test("stop then start at once leaves one connection, and stop ends every timer", async () => {
  const host = await startHost();
  const { sockets, payments } = client(`ws://127.0.0.1:${host.port}/ws`);
  try {
    sockets.start();
    sockets.stop();
    sockets.start();
    await until("connected", () => sockets.state.state === "connected");
    await publish(host.port, "p0");
    await until("a push", () => payments.length >= 1);
    await new Promise((resolve) => setTimeout(resolve, 300));
    // One socket: the host counts one connection.
    const metrics = await (await fetch(`http://127.0.0.1:${host.port}/metrics`)).text();
    assert.match(metrics, /^sockets_connections 1$/m);
  } finally {
    sockets.stop();
    await host.stop();
  }
});

test("pushes across a server restart arrive exactly once and in order", async () => {
  let host = await startHost();
  // Through a proxy that refuses while the host restarts, so that the
  // pushes published meanwhile can only come back by resume, from the log
  // the restarted host reopened.
  const proxy = await proxyTo(host.port);
  const { sockets, payments, states } = client(`ws://127.0.0.1:${proxy.port}/ws`);
  try {
    sockets.start();
    await until("connected", () => sockets.state.state === "connected");
    for (const id of ids(0, 5)) await publish(host.port, id);
    await until("5 pushes", () => payments.length === 5);

    proxy.refusing = true;
    await host.stop();
    await until("disconnected", () => sockets.state.state !== "connected");
    assert.equal(states.find((state) => state.state === "disconnected")?.code, 1001);
    host = await startHost({ port: host.port, dataDir: host.dataDir });
    for (const id of ids(5, 10)) await publish(host.port, id);
    proxy.refusing = false;
    await until("connected again", () => sockets.state.state === "connected");
    for (const id of ids(10, 15)) await publish(host.port, id);
    await until("15 pushes", () => payments.length >= 15);
    await new Promise((resolve) => setTimeout(resolve, 300));

    assert.deepEqual(payments.map((push) => push.paymentId), ids(0, 15));
    assert.equal(new Set(payments.map((push) => push.id)).size, 15);
  } finally {
    sockets.stop();
    proxy.close();
    await host.stop();
    rmSync(host.dataDir, { recursive: true, force: true });
  }
});

test("a token refreshed before it expires keeps the connection", async () => {
  const host = await startHost();
  let issued = 0;
  const { sockets, payments, states } = client(`ws://127.0.0.1:${host.port}/ws`, {
    // Expires 3 s after each call; the host closes at expiry (no leeway).
    token: () => {
      issued += 1;
      return token("s_1", "student", 3);
    },
    refreshBeforeExpiryMs: 1500,
  });
  try {
    sockets.start();
    await until("connected", () => sockets.state.state === "connected");
    const connectedAt = states.length;
    await new Promise((resolve) => setTimeout(resolve, 5_000));
    assert.deepEqual(states.slice(connectedAt), [], "no disconnect while tokens were refreshed");
    assert.ok(issued >= 3, `tokens issued: ${issued}`);
    await publish(host.port, "p-after");
    await until("a push", () => payments.length === 1);
  } finally {
    sockets.stop();
    await host.stop();
  }
});

test("an expired or refused token stops retrying and says why", async () => {
  const host = await startHost();
  try {
    const expired = client(`ws://127.0.0.1:${host.port}/ws`, { token: token("s_1", "student", -60) });
    expired.sockets.start();
    await until("given up", () => expired.states.some((state) => state.state === "disconnected"));
    assert.deepEqual(expired.states.at(-1), { state: "disconnected", code: 4001, reason: "token expired", willRetry: false });

    const forged = client(`ws://127.0.0.1:${host.port}/ws`, { token: token("s_1", "student", 3600, "another secret") });
    forged.sockets.start();
    await until("refused", () => forged.states.some((state) => state.state === "disconnected"));
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    assert.deepEqual(forged.states.at(-1), { state: "disconnected", code: 401, reason: "unauthorized", willRetry: false });
    assert.equal(forged.states.filter((state) => state.state === "connecting").length, 1, "no retry");
  } finally {
    await host.stop();
  }
});

test("emit resolves with the reply's data and rejects with the protocol's code", async () => {
  const host = await startHost();
  const { sockets } = client(`ws://127.0.0.1:${host.port}/ws`);
  try {
    sockets.start();
    const sent = await sockets.emit("sendMessage", { to: "c_1", text: "hello" });
    assert.equal(typeof sent.messageId, "string");
    for (const [event, data, code] of [
      ["sendMessage", { to: "nobody_here", text: "hello" }, "not_found"],
      ["resume", {}, "bad_request"],
      ["noSuchEvent", {}, "unknown_event"],
    ]) {
      await assert.rejects(sockets.emit(event, data), (error) => {
        assert.ok(error instanceof SocketsError);
        assert.equal(error.code, code, `${event}: ${error.message}`);
        return true;
      });
    }
  } finally {
    sockets.stop();
    await host.stop();
  }
});

test("a client wrapped in a Proxy (Vue's reactive, MobX) still works", () => {
  // Private `#fields` would throw "Cannot read private member" here.
  class Inert {
    readyState = 0;
    onopen = null;
    onmessage = null;
    onclose = null;
    onerror = null;
    send() {}
    close() {}
  }
  const client = new Proxy(new SocketsClient({ url: "ws://127.0.0.1:9/ws", token: "t", WebSocket: Inert }), {});
  const states = [];
  client.onState((state) => states.push(state.state));
  client.on("message", () => {});
  client.start();
  assert.equal(client.state.state, "connecting");
  client.stop();
  assert.deepEqual(states, ["connecting", "disconnected"]);
});
