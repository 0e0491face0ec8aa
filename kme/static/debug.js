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

function interopText(interop) {
  const figures = (counts) => Object.entries(counts).map(([state, count]) => state + " " + count).join(", ") || "none";
  return "keys: " + figures(interop.keys) + " · acknowledgements: " + figures(interop.acks);
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
      link.interop ? cell(interopText(link.interop), "text") : peerCell(link.peer),
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

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// One direction's free keys over the last hour, from the samples [[epoch seconds, outbound, inbound], ...]:
// a y axis in keys (0 to the highest sample), an x axis in minutes up to now; "collecting" until the first sample.
function levelChart(history, column) {
  const width = 300, height = 70, left = 48, right = 6, top = 6, bottom = 16;
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const svg = svgElement("svg", {class: "chart", width: width, height: height});
  svg.append(
    svgElement("line", {class: "axis", x1: left, y1: top, x2: left, y2: top + plotHeight}),
    svgElement("line", {class: "axis", x1: left, y1: top + plotHeight, x2: left + plotWidth, y2: top + plotHeight}),
    svgElement("text", {class: "x-label", x: left, y: height - 3}, "−60 min"),
    svgElement("text", {class: "x-label", x: left + plotWidth, y: height - 3, "text-anchor": "end"}, "now"),
  );
  if (history.length === 0) {
    svg.append(svgElement("text", {class: "collecting", x: left + 8, y: top + plotHeight / 2 + 4},
                          "collecting: a sample a minute"));
    return svg;
  }
  const end = history[history.length - 1][0];
  const highest = Math.max(1, ...history.map((sample) => sample[column]));
  svg.append(
    svgElement("text", {class: "y-label", x: left - 4, y: top + 8, "text-anchor": "end"},
               highest === 1 ? "1 key" : highest + " keys"),
    svgElement("text", {class: "y-label", x: left - 4, y: top + plotHeight, "text-anchor": "end"}, "0"),
  );
  const points = history.map((sample) => [
    left + plotWidth - Math.min(1, (end - sample[0]) / 3600) * plotWidth,
    top + plotHeight - sample[column] / highest * plotHeight,
  ]);
  // A single sample is a short mark at its time, not a line across the hour.
  if (points.length === 1) points.unshift([points[0][0] - 4, points[0][1]]);
  svg.append(svgElement("polyline", {points: points.map((point) => point.join(",")).join(" ")}),
             svgElement("title", {}, "up to " + highest + " keys; now " + history[history.length - 1][column]));
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
