// Refreshes the debugging page from /messages and /links without reloading it.
"use strict";

const eventsBox = document.getElementById("events");
const linksBody = document.querySelector("#links tbody");
const directionsBody = document.querySelector("#directions tbody");
const SVG = "http://www.w3.org/2000/svg";
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
      cell(link.unconfirmed, "number unconfirmed"),
      cell(link.discarded, "number"),
      cell(link.set_aside, "number set-aside"),
      cell(link.relayed, "number relayed"),
      cell(link.last_file ? link.last_file + " (" + link.last_file_at + ")" : "—", "text"),
      peerCell(link.peer),
    );
    return tr;
  });
  linksBody.replaceChildren(...rows);
  directionsBody.replaceChildren(...links.flatMap((link) => link.directions.map((way, index) => {
    const tr = document.createElement("tr");
    tr.dataset.direction = way.from + "-" + way.to;
    const chart = cell("", "text");
    chart.append(levelChart(link.history, index + 1));
    tr.append(
      cell("KME " + way.from + " → KME " + way.to, "text"),
      cell(way.available, "number available"),
      cell(way.leased, "number leased"),
      cell(way.in_use === null ? "—" : way.in_use, "number"),
      chart,
    );
    return tr;
  })));
}

// A line of one direction's free keys over the samples [[epoch seconds, outbound, inbound], ...].
function levelChart(history, column) {
  const width = 240, height = 40;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  if (history.length === 0) return svg;
  const end = history[history.length - 1][0];
  const top = Math.max(1, ...history.map((sample) => sample[column]));
  const points = history.map((sample) => [
    width - (end - sample[0]) / 3600 * width,
    height - 2 - sample[column] / top * (height - 4),
  ]);
  if (points.length === 1) points.unshift([0, points[0][1]]);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.map((point) => point.join(",")).join(" "));
  svg.append(line);
  const title = document.createElementNS(SVG, "title");
  title.textContent = "up to " + top + " keys; now " + history[history.length - 1][column];
  svg.append(title);
  return svg;
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
