// The /demo page in a real headless browser: Debian's Chromium, driven by
// puppeteer-core (nothing downloads a browser), against the debug host
// started the way a newcomer starts it: dev mode, no setting but a port
// and a data folder. One page reaches the host through a TCP proxy that
// the test cuts and refuses, as a network drop would. Screenshots are kept
// in target/artifacts (SOCKETS_TEST_ARTIFACTS overrides the folder).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, statSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const hostBinary = process.env.SOCKETS_HOST_BIN ?? path.join(root, "target/debug/sockets-host");
const artifacts = process.env.SOCKETS_TEST_ARTIFACTS ?? path.join(root, "target/artifacts");

/** Debian's Chromium; the test fails (never skips) without it. */
function chromium() {
  if (process.env.SOCKETS_TEST_CHROMIUM) return process.env.SOCKETS_TEST_CHROMIUM;
  try {
    return execFileSync("sh", ["-c", "command -v chromium"], { encoding: "utf8" }).trim();
  } catch {
    throw new Error("no `chromium` on PATH: scripts/test.sh installs Debian's package");
  }
}

/** The host in dev mode with its own data folder; resolves once it listens. */
async function startHost() {
  const dataDir = mkdtempSync(path.join(tmpdir(), "demo-test-"));
  const child = spawn(hostBinary, ["serve"], {
    cwd: dataDir,
    env: { PATH: process.env.PATH, SOCKETS_LISTEN: "127.0.0.1:0", SOCKETS_DATA_DIR: dataDir, SOCKETS_LOG: "warn" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let log = "";
  child.stderr.on("data", (chunk) => (log += chunk));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((resolve) => child.on("exit", resolve));
      child.kill("SIGTERM");
      await exited;
    }
    rmSync(dataDir, { recursive: true, force: true });
  };
  const port = await new Promise((resolve, reject) => {
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
  }).catch(async (error) => {
    await stop();
    throw error;
  });
  return { port, stop };
}

/** A TCP proxy to `port` that can drop every connection and refuse new ones. */
async function startProxy(port) {
  const open = new Set();
  let offline = false;
  const server = net.createServer((inbound) => {
    if (offline) return inbound.destroy();
    const outbound = net.connect(port, "127.0.0.1");
    const pair = [inbound, outbound];
    open.add(pair);
    const drop = () => {
      open.delete(pair);
      inbound.destroy();
      outbound.destroy();
    };
    inbound.on("error", drop).on("close", drop);
    outbound.on("error", drop).on("close", drop);
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: server.address().port,
    cut() {
      offline = true;
      for (const [inbound, outbound] of open) {
        inbound.destroy();
        outbound.destroy();
      }
      open.clear();
    },
    restore() {
      offline = false;
    },
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

/** Opens /demo at `port` and signs in as `user`; resolves once online. */
async function signIn(browser, port, user) {
  const page = await browser.newPage();
  await page.setViewport({ width: 1100, height: 720 });
  const problems = [];
  page.on("pageerror", (error) => problems.push(String(error)));
  await page.goto(`http://127.0.0.1:${port}/demo`);
  await page.waitForSelector("body[data-ready=true]");
  await page.select("#user", user);
  await click(page, "#login-form button");
  await page.waitForSelector("#state[data-state=connected]", { timeout: 15_000 });
  return { page, problems };
}

/** Clicks as a user would, on the page brought to the front (a background tab does not paint). */
async function click(page, selector) {
  await page.bringToFront();
  await page.click(selector);
}

/**
 * Polls `check` until it returns true. (Puppeteer's `waitForFunction`
 * compiles its predicate in the page, which the page's CSP forbids.)
 */
async function until(what, check, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() > deadline) throw new Error(`not within ${timeoutMs} ms: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** How many list items of `list` end with `text`. */
function count(page, list, text) {
  return page.$$eval(`${list} li`, (items, value) => items.filter((li) => li.textContent.endsWith(value)).length, text);
}

async function waitForCount(page, list, text, expected) {
  await until(`${expected} × "${text}" in ${list}`, async () => (await count(page, list, text)) >= expected);
}

/** Sends `text` to `to` from `page`; resolves once the service acknowledged it. */
async function send(page, to, text) {
  await page.$eval("#to", (input, value) => (input.value = value), to);
  await page.$eval("#text", (input, value) => (input.value = value), text);
  await click(page, "#send-form button");
  await until(
    `"${text}" acknowledged`,
    async () => (await page.$$eval("#messages li.mine", (items, value) => items.some((li) => li.textContent.endsWith(value)), text)),
    15_000,
  );
  assert.equal(await page.$eval("#send-error", (p) => p.textContent), "");
}

/** Pages to keep a screenshot of; `after` takes them again if the test failed. */
const shots = new Map();
let finished = false;

/** Screenshots of every page into the artifacts folder; their files. */
async function screenshots(suffix = "") {
  mkdirSync(artifacts, { recursive: true });
  const files = [];
  for (const [name, page] of shots) {
    const file = path.join(artifacts, `demo-${name}${suffix}.png`);
    // A background tab paints no frame to capture.
    await page.bringToFront();
    await page.screenshot({ path: file });
    console.log(`screenshot: ${file}`);
    files.push(file);
  }
  return files;
}

const cleanups = [];
after(async () => {
  if (!finished) await screenshots("-failed").catch((error) => console.log(`no screenshot: ${error}`));
  for (const cleanup of cleanups.reverse()) await cleanup();
});

test("two pages chat; a page that loses its network gets what it missed, once", async () => {
  const host = await startHost();
  cleanups.push(() => host.stop());
  const proxy = await startProxy(host.port);
  cleanups.push(() => proxy.close());
  const browser = await puppeteer.launch({
    executablePath: chromium(),
    headless: true,
    // Chromium's sandbox needs user namespaces, which containers (and
    // root) often lack; the pages are this test's own.
    // Both pages live at once: no throttling of the one in the background.
    args: [
      "--no-sandbox",
      "--disable-dev-shm-usage",
      "--disable-background-timer-throttling",
      "--disable-backgrounding-occluded-windows",
      "--disable-renderer-backgrounding",
    ],
  });
  cleanups.push(() => browser.close());

  const student = await signIn(browser, host.port, "s_1");
  shots.set("student", student.page);
  const consultant = await signIn(browser, proxy.port, "c_1");
  shots.set("consultant", consultant.page);

  // Both ways, live.
  await send(student.page, "c_1", "Hello Carla, are you free on Monday?");
  await waitForCount(consultant.page, "#messages", "Hello Carla, are you free on Monday?", 1);
  await send(consultant.page, "s_1", "Monday at 10 works.");
  await waitForCount(student.page, "#messages", "Monday at 10 works.", 1);

  // A payment notification, live.
  await student.page.select("#payment-student", "s_1");
  await click(student.page, "#payment-form button");
  await waitForCount(student.page, "#notifications", "120 EUR processed", 1);

  // The consultant's network goes away; the student writes and reviews meanwhile.
  proxy.cut();
  await consultant.page.waitForSelector("#state[data-state=disconnected]", { timeout: 15_000 });
  const missed = ["Missed one", "Missed two", "Missed three"];
  for (const text of missed) await send(student.page, "c_1", text);
  await student.page.select("#review-consultant", "c_1");
  await click(student.page, "#review-form button");
  await until("the review published", async () =>
    (await student.page.$eval("#backend-status", (p) => p.textContent)).startsWith("REVIEW_ADDED published"),
  );

  proxy.restore();
  await consultant.page.waitForSelector("#state[data-state=connected]", { timeout: 45_000 });
  for (const text of missed) await waitForCount(consultant.page, "#messages", text, 1);
  await waitForCount(consultant.page, "#notifications", "review from Sam Student", 1);
  // Once each, in the order sent, and nothing else repeated (what came
  // before the drop included).
  await new Promise((resolve) => setTimeout(resolve, 1_000));
  for (const text of [...missed, "Hello Carla, are you free on Monday?"]) {
    assert.equal(await count(consultant.page, "#messages", text), 1, text);
  }
  assert.equal(await count(consultant.page, "#notifications", "review from Sam Student"), 1);
  const shown = await consultant.page.$$eval("#messages li", (items) => items.map((li) => li.textContent));
  const order = missed.map((text) => shown.findIndex((line) => line.endsWith(text)));
  assert.deepEqual([...order].sort((a, b) => a - b), order, `in order: ${shown.join(" | ")}`);
  const ids = await consultant.page.$$eval("li[data-id]", (items) => items.map((li) => li.dataset.id));
  assert.equal(new Set(ids).size, ids.length, "no push id shown twice");
  // The consultant still chats after coming back.
  await send(consultant.page, "s_1", "Back online.");
  await waitForCount(student.page, "#messages", "Back online.", 1);

  for (const file of await screenshots()) assert.ok(statSync(file).size > 10_000, `${file} holds a screenshot`);

  // Signing out leaves no error behind, and another user signs in.
  await click(consultant.page, "#sign-out");
  assert.equal(await consultant.page.$eval("#login-error", (p) => p.textContent), "");
  assert.equal(await consultant.page.$$eval("#messages li", (items) => items.length), 0);
  await consultant.page.select("#user", "c_2");
  await click(consultant.page, "#login-form button");
  await consultant.page.waitForSelector("#state[data-state=connected]", { timeout: 15_000 });
  await send(student.page, "c_2", "Hello Chen.");
  await waitForCount(consultant.page, "#messages", "Hello Chen.", 1);
  assert.equal(await count(consultant.page, "#messages", "Back online."), 0, "nothing of c_1's session");

  assert.deepEqual([...student.problems, ...consultant.problems], [], "no error in the pages");
  finished = true;
});
