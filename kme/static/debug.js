// Refreshes the debugging page from /messages and /links without reloading it.
"use strict";

const eventsBox = document.getElementById("events");
const linksBody = document.querySelector("#links tbody");
let shownEvents = "";

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function peerCell(peer) {
  const td = cell("", "text");
  if (!peer) {
    td.textContent = "—";
    return td;
  }
  const dot = document.createElement("span");
  dot.className = "dot " + (peer.reachable ? "ok" : "bad");
  td.append(dot, (peer.reachable ? "reachable" : "unreachable") + (peer.detail ? " · " + peer.detail : ""));
  return td;
}

async function refreshEvents() {
  const events = await (await fetch("/messages", {cache: "no-store"})).json();
  const text = events.map((e) => e.datetime + ": " + e.message).join("\n");
  if (text === shownEvents) return;
  const atBottom = eventsBox.scrollTop + eventsBox.clientHeight >= eventsBox.scrollHeight - 4;
  eventsBox.textContent = text;
  shownEvents = text;
  if (atBottom) eventsBox.scrollTop = eventsBox.scrollHeight;
}

async function refreshLinks() {
  const links = await (await fetch("/links", {cache: "no-store"})).json();
  const rows = links.map((link) => {
    const tr = document.createElement("tr");
    tr.dataset.link = link.link;
    tr.append(
      cell(link.name, "text"),
      cell(link.available, "number available"),
      cell(link.delivered, "number delivered"),
      cell(link.waiting, "number waiting"),
      cell(link.peer_held, "number"),
      cell(link.reserved, "number"),
      cell(link.discarded, "number"),
      cell(link.last_file ? link.last_file + " (" + link.last_file_at + ")" : "—", "text"),
      peerCell(link.peer),
    );
    return tr;
  });
  linksBody.replaceChildren(...rows);
}

async function refresh() {
  try {
    await Promise.all([refreshEvents(), refreshLinks()]);
  } catch (error) {
    console.warn("refresh failed", error);
  }
  setTimeout(refresh, 500);
}

refresh();
