// A Node `ws` server as a benchmark peer, written the way most apps use the library:
// WebSocket subscribe on /sub/<channel>, HTTP POST /pub/<channel> sends the body as a text
// message to every subscriber of the channel. Usage: node server.js [PORT] (default 8392).
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 8392);
const channels = new Map(); // channel name -> Set of sockets

const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, clientTracking: false });

const server = http.createServer((req, res) => {
  const match = /^\/pub\/([^/?]+)$/.exec(req.url);
  if (req.method !== 'POST' || !match) {
    res.writeHead(404).end();
    return;
  }
  const parts = [];
  req.on('data', (part) => parts.push(part));
  req.on('end', () => {
    const message = Buffer.concat(parts);
    let sent = 0;
    for (const socket of channels.get(match[1]) || []) {
      if (socket.readyState === 1) {
        socket.send(message, { binary: false });
        sent++;
      }
    }
    const body = String(sent);
    res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
  });
});

server.on('upgrade', (req, socket, head) => {
  const match = /^\/sub\/([^/?]+)$/.exec(req.url);
  if (!match) {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const name = match[1];
    if (!channels.has(name)) channels.set(name, new Set());
    const subscribers = channels.get(name);
    subscribers.add(ws);
    ws.on('error', () => {});
    ws.on('close', () => {
      subscribers.delete(ws);
      if (subscribers.size === 0 && channels.get(name) === subscribers) channels.delete(name);
    });
  });
});

server.keepAliveTimeout = 300000;
server.listen(port, '127.0.0.1', () => {
  const version = require('ws/package.json').version;
  console.error(`node ws ${version} (node ${process.version}) on 127.0.0.1:${port}`);
});
