// The demo page: signs in (in dev mode, through the host's /demo/token),
// then chats and shows notifications through the service's client, which
// reconnects and resumes by itself. Nothing here de-duplicates: a push
// shown twice would be the client's fault, and the browser test would see it.
import { SocketsClient } from "/demo/client.js";

const $ = (id) => document.getElementById(id);
const socketUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;

/** @type {SocketsClient | undefined} */
let client;
/** @type {{ signIn: boolean, users: Array<{ id: string, role: string, name?: string }> }} */
let session = { signIn: false, users: [] };
let me = { id: "", role: "" };

const nameOf = (id) => session.users.find((user) => user.id === id)?.name ?? id;
const time = (iso) => (iso ? new Date(iso).toLocaleTimeString() : new Date().toLocaleTimeString());

function show(list, item) {
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

function entry(meta, text, attributes = {}) {
  const li = document.createElement("li");
  const small = document.createElement("span");
  small.className = "meta";
  small.textContent = meta;
  li.append(small, document.createTextNode(text));
  for (const [name, value] of Object.entries(attributes)) li.setAttribute(name, value);
  return li;
}

async function postJson(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error?.message ?? `${path}: HTTP ${response.status}`);
  return answer;
}

/** A JWT's claims, unverified: which user a pasted token is for. */
function claimsOf(token) {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  } catch {
    return {};
  }
}

function fillSelect(select, users) {
  select.replaceChildren(
    ...users.map((user) => {
      const option = document.createElement("option");
      option.value = user.id;
      option.textContent = `${user.name ?? user.id} (${user.role}, ${user.id})`;
      return option;
    }),
  );
}

function setState(state) {
  const badge = $("state");
  badge.dataset.state = state.state;
  const why = state.state === "disconnected" ? state.reason || String(state.code) : "";
  badge.textContent =
    state.state === "connected"
      ? "online"
      : state.state === "connecting"
        ? "connecting…"
        : state.willRetry
          ? `offline (${why}), retrying`
          : `offline: ${why}`;
  // The client gave up (a token refused or expired): say so where it shows.
  $("notice").textContent =
    state.state === "disconnected" && !state.willRetry ? `Disconnected for good: ${why}. Sign out and in again.` : "";
}

/** Back to the sign-in form, with nothing of the last session left. */
function signOut() {
  const stopping = client;
  client = undefined;
  stopping?.stop();
  for (const list of ["messages", "notifications"]) $(list).replaceChildren();
  for (const message of ["send-error", "backend-error", "backend-status", "login-error", "notice"]) {
    $(message).textContent = "";
  }
  $("resume-note").hidden = true;
  $("app").hidden = true;
  $("login").hidden = false;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  const badge = $("state");
  badge.dataset.state = "disconnected";
  badge.textContent = "signed out";
}

function start(token, user) {
  if (client) signOut();
  me = user;
  client = new SocketsClient({ url: socketUrl, token });
  client.onState(setState);
  client.on("message", (message, push) => {
    show(
      $("messages"),
      entry(`${time(message.sentAt)} ${nameOf(message.from)} → ${nameOf(message.to)}`, message.text, {
        "data-id": push.id,
        "data-message-id": message.messageId,
        class: message.from === me.id ? "mine" : "theirs",
      }),
    );
  });
  client.on("paymentProcessed", (payment, push) => {
    const amount = payment.amount !== undefined ? ` ${payment.amount} ${payment.currency ?? ""}` : "";
    show($("notifications"), entry(time(), `Payment ${payment.paymentId}${amount} processed`, { "data-id": push.id }));
  });
  client.on("reviewAdded", (review, push) => {
    const by = review.studentId ? ` from ${nameOf(review.studentId)}` : "";
    show($("notifications"), entry(time(), `New ${review.rating}★ review${by}`, { "data-id": push.id }));
  });
  client.on("resumeFailed", () => ($("resume-note").hidden = false));
  client.start();

  $("who").textContent = `${nameOf(me.id)} (${me.role})`;
  $("login").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  $("backend").hidden = !session.signIn;
  const others = session.users.filter((user) => user.id !== me.id);
  $("people").replaceChildren(
    ...others.map((user) => {
      const option = document.createElement("option");
      option.value = user.id;
      option.label = `${user.name ?? user.id} (${user.role})`;
      return option;
    }),
  );
  const counterpart = others.find((user) => user.role !== me.role);
  if (counterpart) $("to").value = counterpart.id;
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = $("sign-in");
  if (button.disabled) return;
  $("login-error").textContent = "";
  button.disabled = true;
  try {
    if (session.signIn) {
      const id = session.users.length > 0 ? $("user").value : $("user-id").value.trim();
      const first = await postJson("/demo/token", { user: id });
      let fresh = first.token;
      // The first token is used at once; later connects and refreshes ask
      // again, and a refusal shows in the state badge.
      const provider = async () => {
        const token = fresh ?? (await postJson("/demo/token", { user: id })).token;
        fresh = undefined;
        return token;
      };
      start(provider, first.user);
    } else {
      const token = $("token").value.trim();
      const claims = claimsOf(token);
      if (!claims.sub) throw new Error("that is not a JWT");
      start(token, { id: claims.sub, role: claims.role ?? "?" });
    }
  } catch (error) {
    $("login-error").textContent = String(error.message ?? error);
  } finally {
    button.disabled = false;
  }
});

$("sign-out").addEventListener("click", signOut);

$("send-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("send-error").textContent = "";
  const to = $("to").value.trim();
  const text = $("text").value;
  try {
    const reply = await client.emit("sendMessage", { to, text });
    $("text").value = "";
    // This connection gets no copy of its own message: show it from the reply.
    show(
      $("messages"),
      entry(`${time()} ${nameOf(me.id)} → ${nameOf(to)}`, text, {
        "data-message-id": reply.messageId,
        class: "mine",
      }),
    );
  } catch (error) {
    $("send-error").textContent = `${error.code ?? "error"}: ${error.message}`;
  }
});

const uniqueId = (prefix) => `${prefix}_${Date.now().toString(36)}${Math.random().toString(36).slice(2, 6)}`;

async function playBackend(body) {
  $("backend-error").textContent = "";
  $("backend-status").textContent = "";
  try {
    const answer = await postJson("/demo/events", body);
    $("backend-status").textContent = `${body.event} published (${answer.recipients} recipient${answer.recipients === 1 ? "" : "s"}).`;
  } catch (error) {
    $("backend-error").textContent = String(error.message ?? error);
  }
}

$("payment-form").addEventListener("submit", (event) => {
  event.preventDefault();
  void playBackend({
    event: "PAYMENT_PROCESSED",
    data: { paymentId: uniqueId("pay"), studentId: $("payment-student").value, amount: 120, currency: "EUR", status: "succeeded" },
  });
});

$("review-form").addEventListener("submit", (event) => {
  event.preventDefault();
  void playBackend({
    event: "REVIEW_ADDED",
    data: {
      reviewId: uniqueId("rev"),
      consultantId: $("review-consultant").value,
      rating: 5,
      comment: "Great session",
      ...(me.role === "student" ? { studentId: me.id } : {}),
    },
  });
});

async function load() {
  try {
    const response = await fetch("/demo/session");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    session = await response.json();
  } catch (error) {
    $("login-error").textContent = `Cannot reach the service: ${error.message ?? error}`;
    return;
  }
  if (session.signIn && session.users.length > 0) {
    $("pick-user").hidden = false;
    fillSelect($("user"), session.users);
  } else if (session.signIn) {
    $("type-user").hidden = false;
  } else {
    $("paste-token").hidden = false;
    $("login-note").textContent =
      "This server does not sign the demo in by itself (a key is configured, or it listens beyond this machine): paste a token for a student or consultant.";
  }
  fillSelect($("payment-student"), session.users.filter((user) => user.role === "student"));
  fillSelect($("review-consultant"), session.users.filter((user) => user.role === "consultant"));
  $("sign-in").disabled = false;
  document.body.dataset.ready = "true";
}

void load();
