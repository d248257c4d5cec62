// The Streamfold operator console: plain DOM, no framework, nothing from elsewhere.
// The operator token lives in this tab's sessionStorage and goes out only in the
// Authorization header of the console's own requests (never a cookie).
"use strict";

const $ = (selector) => document.querySelector(selector);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function notice(text, kind) {
  const box = $("#notice");
  box.textContent = text;
  box.className = kind || "info";
  box.hidden = !text;
}

function token() {
  return sessionStorage.getItem("streamfold-operator-token");
}

async function call(path, options) {
  const headers = { Accept: "application/json" };
  const held = token();
  if (held) headers.Authorization = "Bearer " + held;
  const init = { method: "GET", headers };
  if (options && options.body !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
  }
  const response = await fetch(path, init);
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    const error = new Error(body.error || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

// A read the page shows: its answer, or null once the failure is shown as a notice.
async function fetchShown(path) {
  try {
    return await call(path);
  } catch (error) {
    notice(error.message, "error");
    return null;
  }
}

// -- sign-in ------------------------------------------------------------------------

let operator = null;

async function refreshSession() {
  try {
    const session = await call("/console/api/session");
    operator = session.operator;
    $("#who").textContent = operator
      ? "operator: " + operator
      : session.actions_enabled ? "read-only (sign in to act)" : "read-only (no operator credential configured)";
  } catch (error) {
    sessionStorage.removeItem("streamfold-operator-token");
    operator = null;
    $("#who").textContent = "read-only";
    notice("Sign-in refused: " + error.message, "error");
  }
  $("#signout").hidden = !operator;
  $("#token").hidden = Boolean(operator);
  $("#signin button[type=submit]").hidden = Boolean(operator);
}

$("#signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = $("#token").value.trim();
  if (value) sessionStorage.setItem("streamfold-operator-token", value);
  $("#token").value = "";
  notice("");
  await refreshSession();
});

$("#signout").addEventListener("click", async () => {
  sessionStorage.removeItem("streamfold-operator-token");
  await refreshSession();
});

// -- pages --------------------------------------------------------------------------

const loaders = {};

function show(page) {
  for (const section of document.querySelectorAll(".page")) {
    section.hidden = section.id !== "page-" + page;
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.dataset.page === page);
  }
  if (loaders[page]) loaders[page]();
}

window.addEventListener("hashchange", () => show(location.hash.slice(1) || "events"));

// -- events ---------------------------------------------------------------------------

function pretty(value) {
  return JSON.stringify(value, null, 2);
}

async function lookUp(aggregateId, type) {
  notice("");
  const query = type ? "?type=" + encodeURIComponent(type) : "";
  const found = await fetchShown("/console/api/events/" + encodeURIComponent(aggregateId) + query);
  if (!found) return;
  $("#events-title").textContent =
    `Events of ${found.aggregate_type} ${found.aggregate_id} (${found.events.length})`;
  const rows = found.events.map((e) =>
    el("tr", {
      class: "event",
      "data-version": e.stream_version,
      onclick: () => stateAt(found.aggregate_type, found.aggregate_id, e.stream_version),
    },
      el("td", {}, e.stream_version),
      el("td", {}, e.event_type),
      el("td", {}, e.record_name + " v" + (e.schema_version ?? "?")),
      el("td", {}, e.occurred_at),
      el("td", {}, `${e.topic}[${e.partition}]@${e.offset}`),
      el("td", {},
        el("a", {
          href: "#events",
          class: "flow-link",
          onclick: (event) => { event.stopPropagation(); showFlow(e.correlation_id); },
        }, e.correlation_id)),
      el("td", {},
        el("details", {}, el("summary", {}, "data"), el("pre", {}, pretty(e.data))),
        el("details", {}, el("summary", {}, "headers"), el("pre", {}, pretty(e.headers)))),
    ));
  $("#events tbody").replaceChildren(...rows);
}

async function stateAt(type, aggregateId, version) {
  for (const row of document.querySelectorAll("#events tr.event")) {
    row.classList.toggle("selected", row.dataset.version === String(version));
  }
  const found = await fetchShown(
    `/query/state/${encodeURIComponent(aggregateId)}?type=${type}&version=${version}`);
  if (!found) return;
  $("#state").textContent = `${type} ${aggregateId} as of version ${found.version}\n` +
    pretty(found.state);
}

async function showFlow(correlationId) {
  $("#correlation-id").value = correlationId;
  const found = await fetchShown("/console/api/flows/" + encodeURIComponent(correlationId));
  if (!found) return;
  $("#flow-title").textContent = `Flow ${correlationId} (${found.events.length} events)`;
  $("#flow").replaceChildren(...found.events.map((e) =>
    el("li", { class: "step" },
      el("time", {}, e.occurred_at),
      el("strong", {}, " " + e.event_type),
      ` ${e.aggregate_type} ${e.aggregate_id} v${e.stream_version}`,
      el("div", { class: "hint" }, `caused by ${e.causation_id || "—"} · user ${e.user_id ?? "—"}`),
    )));
}

$("#find-aggregate").addEventListener("submit", (event) => {
  event.preventDefault();
  lookUp($("#aggregate-id").value.trim(), $("#aggregate-type").value);
});

$("#find-flow").addEventListener("submit", (event) => {
  event.preventDefault();
  showFlow($("#correlation-id").value.trim());
});

// -- dead letters ---------------------------------------------------------------------

function confirmAction(title, text, reasonRequired) {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-reason").value = "";
  $("#confirm-reason").required = reasonRequired;
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "ok" ? $("#confirm-reason").value : null);
    }, { once: true });
    dialog.showModal();
  });
}

async function act(verb, body, title, text) {
  const reason = await confirmAction(title, text, verb === "discard");
  if (reason === null) return;
  try {
    const done = await call("/console/api/dead-letters/" + verb,
      { body: { ...body, reason, confirmed: true } });
    notice(`${verb}: ${done.actions.length} record(s) by ${done.actions[0].operator}`, "info");
  } catch (error) {
    notice(`${verb} refused (${error.status}): ${error.message}`, "error");
  }
  await loadDeadLetters();
}

function letterRow(letter) {
  const open = letter.standing === "open";
  const where = `${letter.source.topic}[${letter.source.partition}]@${letter.source.offset}`;
  const buttons = open ? [
    el("button", {
      class: "redrive",
      onclick: () => act("redrive", { record: letter.id }, "Re-drive one record",
        `Produce ${letter.size} bytes of ${letter.id} as a new record to ${where.split("@")[0]}.`),
    }, "Re-drive"),
    letter.aggregate_id ? el("button", {
      class: "redrive-aggregate",
      onclick: () => act("redrive", { topic: letter.topic, aggregate_id: letter.aggregate_id },
        "Re-drive an aggregate",
        `Produce every open record of ${letter.aggregate_id} in ${letter.topic}, in order, to ${letter.source.topic}.`),
    }, "Re-drive aggregate") : null,
    el("button", {
      class: "discard",
      onclick: () => act("discard", { record: letter.id }, "Discard",
        `Mark ${letter.id} discarded. Its bytes stay in ${letter.topic}.`),
    }, "Discard"),
  ] : [letter.action ? `${letter.action.operator} · ${letter.action.at}` : ""];
  return el("tr", { class: "letter " + letter.standing, "data-id": letter.id },
    el("td", {}, letter.id, el("div", { class: "hint" }, letter.dead_lettered_at)),
    el("td", {}, letter.kind + (letter.projection ? ` (${letter.projection})` : "")),
    el("td", { class: "reason" }, letter.reason),
    el("td", {}, where),
    el("td", {}, letter.aggregate_id ?? "—"),
    el("td", { class: "standing" }, letter.standing),
    el("td", {}, buttons,
      el("details", {}, el("summary", {}, "decoded"), el("pre", {}, pretty(letter.decoded))),
      el("details", {}, el("summary", {}, `bytes (${letter.size})`), el("pre", { class: "hex" }, letter.hex)),
      el("details", {}, el("summary", {}, "headers"), el("pre", {}, pretty(letter.headers)))),
  );
}

async function loadDeadLetters() {
  const found = await fetchShown("/console/api/dead-letters");
  if (!found) return;
  const open = found.letters.filter((l) => l.standing === "open").length;
  $("#dead-letter-count").textContent =
    `${found.letters.length} dead letters, ${open} open, in ${found.topics.length} topics`;
  $("#dead-letters tbody").replaceChildren(...found.letters.map(letterRow));
  $("#actions tbody").replaceChildren(...found.actions.map((a) =>
    el("tr", { class: "action" },
      el("td", {}, a.at), el("td", {}, a.operator), el("td", {}, a.verb),
      el("td", {}, a.record), el("td", {}, a.reason), el("td", {}, a.produced ?? "—"))));
}

loaders["dead-letters"] = loadDeadLetters;
$("#refresh-dead-letters").addEventListener("click", loadDeadLetters);

// -- processors and projections ---------------------------------------------------------

let live = null;

function cell(value) {
  return el("td", {}, value === null || value === undefined ? "—" : value);
}

function showLive(document_) {
  $("#stream-state").textContent = "live · " + document_.at;
  const chooser = $("#replay-projection");
  if (chooser.options.length !== document_.projections.length) {
    chooser.replaceChildren(...document_.projections.map((p) => el("option", { value: p }, p)));
  }
  $("#processors tbody").replaceChildren(...document_.rows.map((r) =>
    el("tr", { class: "processor " + r.kind, "data-name": r.name, "data-partition": r.partition },
      cell(`${r.kind} ${r.name}`), cell(`${r.topic}[${r.partition}]`), cell(r.owner),
      cell(r.position), cell(r.head), el("td", { class: "lag" }, r.lag_events ?? "—"),
      cell(r.lag_seconds), el("td", { class: "error" }, r.error ?? ""))));
  $("#replays tbody").replaceChildren(...document_.replays.map((r) =>
    el("tr", { class: "replay " + r.state, "data-projection": r.projection },
      cell(r.projection), cell(r.operator), cell(r.started_at),
      el("td", { class: "state" }, r.state),
      cell(r.total === null ? null : `${r.done}/${r.total}`),
      el("td", { class: "lag" }, r.lag_events ?? "—"), cell(r.last_line))));
}

function watchLive() {
  if (live) return;
  live = new EventSource("/console/api/live");
  live.onmessage = (message) => showLive(JSON.parse(message.data));
  live.onerror = () => { $("#stream-state").textContent = "reconnecting…"; };
}

loaders.processors = watchLive;

$("#start-replay").addEventListener("submit", async (event) => {
  event.preventDefault();
  const projection = $("#replay-projection").value;
  const reason = await confirmAction("Start a blue/green replay",
    `Rebuild ${projection} from the start of its topics into new tables, then switch.`, false);
  if (reason === null) return;
  try {
    await call("/console/api/replays", { body: { projection, reason, confirmed: true } });
    notice(`replay of ${projection} started`, "info");
  } catch (error) {
    notice(`replay refused (${error.status}): ${error.message}`, "error");
  }
});

// -- schemas ----------------------------------------------------------------------------

async function loadSchemas() {
  const found = await fetchShown("/console/api/schemas");
  if (!found) return;
  $("#subjects tbody").replaceChildren(...found.subjects.map((s) =>
    el("tr", { class: "subject", "data-subject": s.subject },
      el("td", {}, s.subject),
      el("td", {}, s.kind),
      el("td", {}, `${s.registry_versions} registered (schemas/: v${s.catalog_versions.join(", v")})`),
      el("td", { class: "mode" }, s.compatibility),
      el("td", {}, Object.entries(s.upcasters).map(([step, f]) => `${step} ${f}`).join("; ") || "—"),
      el("td", {}, s.registry_versions > 1 ? el("button", {
        class: "diff",
        onclick: () => showDiff(s.subject, s.registry_versions - 1, s.registry_versions),
      }, `diff v${s.registry_versions - 1}→v${s.registry_versions}`) : ""))));
}

async function showDiff(subject, from, to) {
  $("#diff-subject").value = subject;
  $("#diff-from").value = from;
  $("#diff-to").value = to;
  const found = await fetchShown(`/console/api/schemas/diff?subject=${encodeURIComponent(subject)}&from=${from}&to=${to}`);
  if (!found) return;
  $("#diff-title").textContent = `${found.record}: v${found.from} → v${found.to} (${found.compatibility})`;
  $("#bridges").replaceChildren(...found.bridges.map((b) => el("li", { class: "bridge" }, b)));
  $("#schema-diff").replaceChildren(...found.diff.map((line) =>
    el("span", { class: line.startsWith("+") ? "added" : line.startsWith("-") ? "removed" : "" }, line + "\n")));
}

loaders.schemas = loadSchemas;

$("#schema-diff-form").addEventListener("submit", (event) => {
  event.preventDefault();
  showDiff($("#diff-subject").value.trim(), $("#diff-from").value, $("#diff-to").value);
});

// -- sagas ------------------------------------------------------------------------------

async function showSaga(orderId) {
  const saga = await fetchShown("/sagas/" + encodeURIComponent(orderId));
  if (!saga) return;
  notice("");
  $("#saga-title").textContent = `Saga of order ${saga.order_id}`;
  $("#saga-summary").textContent =
    `${saga.phase} · money ${saga.money} · ${saga.amount_minor} ${saga.currency} from ` +
    `${saga.account_id} · ${saga.settled ? "settled" : "in flight"} · correlation ${saga.correlation_id}`;
  $("#saga-steps").replaceChildren(...saga.history.map((entry) =>
    el("li", { class: "saga-step" },
      el("time", {}, entry.at),
      el("strong", {}, " " + entry.message_type),
      ` → ${entry.phase} (money ${entry.money})`,
      entry.note ? el("div", { class: "hint" }, entry.note) : null,
      entry.sent.map((sent) => el("div", { class: "sent" }, `sent ${sent.command_type} ${sent.command_id}`)))));
}

$("#find-saga").addEventListener("submit", (event) => {
  event.preventDefault();
  showSaga($("#saga-order").value.trim());
});

// -- start ---------------------------------------------------------------------------

refreshSession().then(() => show(location.hash.slice(1) || "events"));
