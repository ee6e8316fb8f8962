// Compiled (not run) by `npm test`: the WebSocket classes users pass fit
// the published declarations (dist/index.d.ts) under strict TypeScript.
import WebSocket from "ws";
import { SocketsClient } from "../dist/index.js";

export const withWs = new SocketsClient({ url: "ws://127.0.0.1:8080/ws", token: "t", WebSocket });
export const withDom = new SocketsClient({ url: "ws://127.0.0.1:8080/ws", token: () => "t", WebSocket: globalThis.WebSocket });
