// Tenantry's admin console: plain JavaScript, served by `serve` itself
// (`api::console`), talking only to the service's own JSON API. The access
// token lives in this module's memory only (never in storage or a cookie):
// a reload signs out, and no other page or script can read it. Every value
// reaches the page as text (textContent), never as HTML.

let session = null; // { token, username, admin }

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");
const signOut = document.getElementById("sign-out");

// An element: h("a", { href: "#/x" }, "text", child, …).
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// Every navigation (and signing out) is a new view; a page still loading
// for an older one draws nothing when it arrives.
let current = 0;
let focused = 0;

function show(view, title, ...content) {
  if (view !== current) return false;
  document.title = `${title} · Tenantry console`;
  main.replaceChildren(h("h1", {}, title), ...content.filter((c) => c !== null && c !== undefined));
  // Focus moves to the page when it is new, not when it is redrawn (a
  // running fleet run is redrawn every second).
  if (focused !== view) {
    focused = view;
    main.focus();
  }
  return true;
}

function message(text, kind = "error") {
  return h("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code;
  }
}

// A call to the service's API as the signed-in admin.
async function api(method, path, body) {
  const headers = { accept: "application/json" };
  if (session) headers.authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
  });
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (response.status === 401 && session) {
    end("Your session ended; sign in again.");
    throw new ApiError(401, json);
  }
  if (response.status === 401) throw new ApiError(401, json);
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

function bytes(n) {
  if (n === null || n === undefined) return "not measured";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u += 1;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

function when(t) {
  return t ? new Date(t).toLocaleString() : "—";
}

// ---- signing in and out ----

function end(why) {
  clearTimeout(polling);
  const refresh = session?.refresh;
  session = null;
  // The sign-in's session on the server ends too.
  if (refresh) {
    fetch("/api/auth/logout", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ refresh_token: refresh }),
      credentials: "omit",
    }).catch(() => {});
  }
  nav.hidden = true;
  signOut.hidden = true;
  who.textContent = "";
  signIn(why);
}

function signIn(why) {
  const username = h("input", { id: "username", name: "username", autocomplete: "username", required: true });
  const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
  const form = h(
    "form",
    { class: "stack", onsubmit: async (e) => {
      e.preventDefault();
      try {
        const tokens = await api("POST", "/api/auth/login", { username: username.value, password: password.value });
        session = { token: tokens.access_token, refresh: tokens.refresh_token, username: username.value, admin: false, citus: false };
        await role();
      } catch (err) {
        session = null;
        signIn(err.status === 401 ? "Wrong username or password." : err.message);
      }
    } },
    h("label", { for: "username" }, "Username", username),
    h("label", { for: "password" }, "Password", password),
    h("button", { type: "submit" }, "Sign in"),
  );
  show(++current, "Sign in", why ? message(why) : null, form);
  username.focus();
}

// Admin, auditor (audit only), or neither (signed out again).
async function role() {
  try {
    await api("GET", "/admin/tenants?limit=1");
    session.admin = true;
  } catch (err) {
    if (err.status !== 403) throw err;
    try {
      await api("GET", "/admin/audit?limit=1");
    } catch (e) {
      if (e.status !== 403) throw e;
      session = null;
      signIn("This account is neither an admin nor an auditor.");
      return;
    }
  }
  nav.hidden = false;
  for (const a of nav.querySelectorAll("[data-role=admin]")) a.hidden = !session.admin;
  for (const a of nav.querySelectorAll("[data-role=citus]")) a.hidden = true;
  delete nav.dataset.cluster;
  if (session.admin) probeCluster(session);
  signOut.hidden = false;
  who.textContent = `${session.username} (${session.admin ? "admin" : "auditor"})`;
  if (!location.hash || location.hash === "#/" || (!session.admin && !location.hash.startsWith("#/audit"))) {
    location.hash = session.admin ? "#/tenants" : "#/audit";
  } else {
    route();
  }
}

// The cluster page is there on a Citus coordinator only (409 elsewhere).
// Asked after signing in, not waited for: a cluster with a worker down
// must not keep an admin out of the other pages. Any answer but 409 (an
// error of a cluster too) shows the page.
async function probeCluster(asked) {
  let citus;
  try {
    await api("GET", "/admin/cluster");
    citus = true;
  } catch (err) {
    citus = err.status !== 409 && err.status !== 401 && err.status !== 403;
  }
  if (session !== asked) return;
  session.citus = citus;
  for (const a of nav.querySelectorAll("[data-role=citus]")) a.hidden = !citus;
  nav.dataset.cluster = citus ? "yes" : "no";
}

signOut.addEventListener("click", () => end("Signed out."));

// ---- pages ----

async function tenantsPage(view, params) {
  const q = params.get("q") || "";
  const status = params.get("status") || "";
  const version = params.get("version") || "";
  const sort = params.get("sort") || "";
  const cursor = params.get("cursor") || "";
  const search = h("input", { id: "q", name: "q", type: "search", value: q, placeholder: "part of a name" });
  const statusSelect = h(
    "select",
    { id: "status", name: "status" },
    ["", "active", "suspended", "migrating", "failed", "deleting"].map((s) =>
      h("option", { value: s, selected: s === status }, s || "any"),
    ),
  );
  const versionInput = h("input", { id: "version", name: "version", type: "number", min: 1, value: version, inputmode: "numeric" });
  const sortSelect = h(
    "select",
    { id: "sort", name: "sort" },
    [["", "name"], ["size", "size, largest first"]].map(([v, label]) => h("option", { value: v, selected: v === sort }, label)),
  );
  const filters = h(
    "form",
    { class: "filters", role: "search", onsubmit: (e) => {
      e.preventDefault();
      const next = new URLSearchParams();
      if (search.value) next.set("q", search.value);
      if (statusSelect.value) next.set("status", statusSelect.value);
      if (versionInput.value) next.set("version", versionInput.value);
      if (sortSelect.value) next.set("sort", sortSelect.value);
      location.hash = `#/tenants?${next}`;
    } },
    h("label", { for: "q" }, "Name", search),
    h("label", { for: "status" }, "Status", statusSelect),
    h("label", { for: "version" }, "Template version", versionInput),
    h("label", { for: "sort" }, "Sort by", sortSelect),
    h("button", { type: "submit" }, "Search"),
  );
  const query = new URLSearchParams({ limit: "50" });
  if (q) query.set("q", q);
  if (status) query.set("status", status);
  if (version) query.set("version", version);
  if (sort) query.set("sort", sort);
  if (cursor) query.set("cursor", cursor);
  let page;
  try {
    page = await api("GET", `/admin/tenants?${query}`);
  } catch (err) {
    show(view, "Tenants", filters, message(err.message));
    return;
  }
  const rows = page.items.map((t) =>
    h(
      "tr",
      {},
      h("td", {}, h("a", { href: `#/tenants/${encodeURIComponent(t.username)}` }, t.username)),
      h("td", { class: `status-${t.status}` }, t.status),
      h("td", { class: "num" }, t.template_version),
      h("td", { class: "num" }, bytes(t.usage_bytes)),
      h("td", {}, t.over_quota_since ? "yes" : "no"),
      h("td", {}, t.email_verified ? "yes" : "no"),
    ),
  );
  const table = h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { "aria-label": "Tenants" },
      h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Status"), h("th", { class: "num" }, "Version"), h("th", { class: "num" }, "Size"), h("th", {}, "Over quota"), h("th", {}, "Email verified"))),
      h("tbody", {}, rows),
    ),
  );
  let more = null;
  if (page.next_cursor) {
    const next = new URLSearchParams(query);
    next.delete("limit");
    next.set("cursor", page.next_cursor);
    more = h("p", {}, h("a", { href: `#/tenants?${next}` }, "Next page"));
  }
  show(view, "Tenants", filters, page.items.length ? table : h("p", {}, "No tenant matches."), more);
}

async function tenantPage(view, name, notice) {
  let t;
  try {
    t = await api("GET", `/admin/tenants/${encodeURIComponent(name)}`);
  } catch (err) {
    show(view, name, message(err.status === 404 ? `There is no tenant named ${name}.` : err.message));
    return;
  }
  const quota = t.own_quota_bytes === null ? "the default" : t.own_quota_bytes === 0 ? "none" : bytes(t.own_quota_bytes);
  const details = h(
    "dl",
    {},
    [
      ["Status", t.status],
      ["Suspended since", t.suspended_at ? `${when(t.suspended_at)}${t.suspension_reason ? ` (${t.suspension_reason})` : ""}` : "—"],
      ["Template version", t.template_version],
      ["Email", t.email],
      ["Email verified", t.email_verified ? "yes" : "no"],
      ["Size", t.usage_bytes === null ? "not measured yet" : `${bytes(t.usage_bytes)} (measured ${when(t.usage_measured_at)})`],
      ["Quota", quota],
      ["Over quota since", when(t.over_quota_since)],
      ["Sessions", t.sessions],
      ...(session.citus || t.node ? [["Node", t.node || "not placed"]] : []),
      ["Schema", t.schema],
      ["Created", when(t.created_at)],
    ].map(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k }, v)]),
  );
  const actions = h("div", { class: "actions" });
  if (t.status === "suspended") {
    actions.append(
      h("form", { onsubmit: (e) => change(e, "resume", undefined) }, h("button", { type: "submit" }, "Resume")),
    );
  } else {
    const reason = h("input", { id: "reason", name: "reason", maxlength: 500 });
    actions.append(
      h(
        "form",
        { onsubmit: (e) => change(e, "suspend", reason.value ? { reason: reason.value } : {}) },
        h("label", { for: "reason" }, "Reason (optional)", reason),
        h("button", { type: "submit" }, "Suspend"),
      ),
    );
  }
  const typed = h("input", { id: "confirm-name", name: "confirm-name", autocomplete: "off" });
  actions.append(
    h(
      "form",
      { onsubmit: async (e) => {
        e.preventDefault();
        if (typed.value !== t.username) {
          tenantPage(view, name, message(`Type ${t.username} to erase this tenant.`));
          return;
        }
        try {
          const receipt = await api("DELETE", `/admin/tenants/${encodeURIComponent(t.username)}`);
          show(view, `${t.username} erased`, message("Erased. The receipt:", "ok"), h("pre", { "aria-label": "Erasure receipt" }, JSON.stringify(receipt, null, 2)));
        } catch (err) {
          tenantPage(view, name, message(err.message));
        }
      } },
      h("label", { for: "confirm-name" }, `Type ${t.username} to erase it for good`, typed),
      h("button", { type: "submit", class: "danger" }, "Erase"),
    ),
  );
  async function change(e, action, body) {
    e.preventDefault();
    try {
      await api("POST", `/admin/tenants/${encodeURIComponent(t.username)}/${action}`, body);
      tenantPage(view, name, message(action === "suspend" ? "Suspended." : "Resumed.", "ok"));
    } catch (err) {
      tenantPage(view, name, message(err.message));
    }
  }
  show(view, t.username, notice || null, details, actions, h("p", {}, h("a", { href: "#/tenants" }, "All tenants")));
}

// An audit entry's details as "key: value, …".
function details(d) {
  if (!d || typeof d !== "object") return d === null || d === undefined ? "" : String(d);
  return Object.entries(d)
    .map(([k, v]) => `${k}: ${typeof v === "string" ? v : JSON.stringify(v)}`)
    .join(", ");
}

async function auditPage(view, params) {
  const action = params.get("action") || "";
  const actionInput = h("input", { id: "action", name: "action", value: action, placeholder: "e.g. tenant_suspended" });
  const filters = h(
    "form",
    { class: "filters", onsubmit: (e) => {
      e.preventDefault();
      location.hash = actionInput.value ? `#/audit?action=${encodeURIComponent(actionInput.value)}` : "#/audit";
    } },
    h("label", { for: "action" }, "Action", actionInput),
    h("button", { type: "submit" }, "Filter"),
  );
  const query = new URLSearchParams({ limit: "100" });
  if (action) query.set("action", action);
  if (params.get("cursor")) query.set("cursor", params.get("cursor"));
  let page;
  let verdict;
  try {
    [page, verdict] = await Promise.all([api("GET", `/admin/audit?${query}`), api("GET", "/admin/audit/verify")]);
  } catch (err) {
    show(view, "Audit log", filters, message(err.message));
    return;
  }
  const chain = verdict.intact
    ? message(
        `Chain verified: ${verdict.entries} entries, ${verdict.anchors} anchor(s) match.${verdict.anchors ? "" : " (No anchor written yet: serve writes them to its anchor file as it runs.)"}`,
        "ok",
      )
    : message(`The chain is broken at entry ${verdict.broken_at}: ${verdict.reason}`);
  chain.id = "chain";
  const rows = page.items.map((e) =>
    h("tr", {}, h("td", { class: "num" }, e.seq), h("td", {}, when(e.at)), h("td", {}, e.action), h("td", { class: "pseudonym" }, e.actor || ""), h("td", { class: "pseudonym" }, e.subject || ""), h("td", { class: "details" }, details(e.details))),
  );
  show(
    view,
    "Audit log",
    chain,
    h("p", { class: "hint" }, "Actors and subjects are pseudonyms: the log keeps no names or addresses."),
    filters,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { "aria-label": "Audit log" },
        h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Seq"), h("th", {}, "At"), h("th", {}, "Action"), h("th", {}, "Actor"), h("th", {}, "Subject"), h("th", {}, "Details"))),
        h("tbody", {}, rows),
      ),
    ),
    page.next_cursor
      ? h("p", {}, h("a", { href: `#/audit?${new URLSearchParams({ ...(action ? { action } : {}), cursor: page.next_cursor })}` }, "Older entries"))
      : null,
  );
}

// The run page's poll, stopped when the page changes.
let polling = null;

function definitionList(pairs) {
  return h("dl", {}, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k }, v)]));
}

async function fleetPage(view) {
  let f;
  try {
    f = await api("GET", "/admin/fleet");
  } catch (err) {
    show(view, "Fleet", message(err.message));
    return;
  }
  const summary = definitionList([
    ["Latest version", f.target_version],
    ["Tenants", f.tenants],
    ["Behind the latest", f.pending],
    ["Their last attempt failed", f.failed],
    ["Drift", f.drift],
    ["Templates", f.template_problem || "in order"],
  ]);
  const versions = h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { "aria-label": "Tenants per version", class: "compact" },
      h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Version"), h("th", { class: "num" }, "Tenants"))),
      h("tbody", {}, f.versions.map((v) => h("tr", {}, h("td", { class: "num" }, v.version), h("td", { class: "num" }, v.tenants)))),
    ),
  );
  const target = h("input", { id: "target", name: "target", type: "number", min: 1, max: f.target_version, value: f.target_version });
  const concurrency = h("input", { id: "concurrency", name: "concurrency", type: "number", min: 1, max: 64, value: 4 });
  const canary = h("input", { id: "canary", name: "canary", type: "number", min: 0, value: 1 });
  const preview = h("div", { id: "preview", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "filters", onsubmit: async (e) => {
      e.preventDefault();
      const options = {
        target_version: Number(target.value),
        concurrency: Number(concurrency.value),
        canary: Number(canary.value),
      };
      // The service's own plan (a dry run): nothing is started.
      let plan;
      try {
        plan = await api("POST", "/admin/fleet/migrations", { ...options, dry_run: true });
      } catch (err) {
        if (view === current) preview.replaceChildren(message(err.message));
        return;
      }
      if (view !== current) return;
      const to = plan.target_version;
      const start = h("button", { type: "button", id: "start-run", onclick: async () => {
        start.disabled = true;
        try {
          const run = await api("POST", "/admin/fleet/migrations", options);
          if (view === current) location.hash = `#/fleet/runs/${run.run_id}`;
        } catch (err) {
          preview.replaceChildren(message(err.message));
        }
      } }, "Start the run");
      const names = plan.tenants.map((t) => `${t.username} (V${t.from_version})`).join(", ");
      preview.replaceChildren(
        h("p", { class: "message ok" }, plan.planned
          ? `The run migrates ${plan.planned} tenant(s) to version ${to}, ${options.concurrency} at a time, the first ${options.canary} alone (a canary that fails stops it).`
          : `No tenant is behind version ${to}.`),
        plan.planned ? h("p", { class: "hint", id: "planned" }, `In this order: ${names}${plan.planned > plan.tenants.length ? ", …" : ""}`) : null,
        plan.planned ? start : null,
      );
    } },
    h("label", { for: "target" }, "Target version", target),
    h("label", { for: "concurrency" }, "At a time", concurrency),
    h("label", { for: "canary" }, "Canary tenants", canary),
    h("button", { type: "submit" }, "Preview the run"),
  );
  const runs = [];
  if (f.active_run) runs.push(h("p", {}, h("a", { href: `#/fleet/runs/${f.active_run}` }, `Run ${f.active_run} is under way`)));
  if (f.last_run) runs.push(h("p", {}, "Last run: ", h("a", { href: `#/fleet/runs/${f.last_run.run_id}` }, `${f.last_run.run_id} (${f.last_run.status})`)));
  show(view, "Fleet", summary, versions, ...runs, h("h2", {}, "Migrate the fleet"), form, preview);
}

async function runPage(view, id) {
  let report;
  try {
    report = await api("GET", `/admin/fleet/migrations/${encodeURIComponent(id)}`);
  } catch (err) {
    show(view, `Run ${id}`, message(err.status === 404 ? `There is no run ${id}.` : err.message));
    return;
  }
  const seconds = Math.max(((report.finished_at ? new Date(report.finished_at) : new Date()) - new Date(report.started_at)) / 1000, 0.001);
  const rate = report.done / seconds;
  const left = report.planned - report.done;
  const eta = report.status === "running" && rate > 0 ? `${Math.ceil(left / rate)} s` : "—";
  const failures = report.failures.length
    ? h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { "aria-label": "Failed tenants" },
          h("thead", {}, h("tr", {}, h("th", {}, "Tenant"), h("th", {}, "From"), h("th", {}, "To"), h("th", {}, "Error"))),
          h("tbody", {}, report.failures.map((t) => h("tr", {}, h("td", {}, t.username), h("td", {}, t.from_version), h("td", {}, t.to_version), h("td", { class: "error" }, t.error || "")))),
        ),
      )
    : null;
  let retry = null;
  if (report.status !== "running" && report.failed > 0) {
    // The same run again: it takes the tenants still behind its target,
    // with its own canary and concurrency.
    retry = h("button", { type: "button", id: "retry-failed", onclick: async () => {
      retry.disabled = true;
      try {
        const run = await api("POST", "/admin/fleet/migrations", {
          target_version: report.target_version,
          concurrency: report.concurrency,
          canary: report.canary,
        });
        if (view === current) location.hash = `#/fleet/runs/${run.run_id}`;
      } catch (err) {
        show(view, `Run ${id}`, message(err.message));
      }
    } }, "Run again for the tenants still behind");
  }
  const shown = show(
    view,
    `Run ${report.run_id}`,
    definitionList([
      ["Status", report.status],
      ["Target version", report.target_version],
      ["Progress", `${report.done} of ${report.planned}`],
      ["Succeeded", report.succeeded],
      ["Failed", report.failed],
      ["Rate", `${rate.toFixed(1)} tenants/s`],
      ["Time left", eta],
      ["Started by", report.started_by],
    ]),
    h("progress", { max: Math.max(report.planned, 1), value: report.done, "aria-label": "Progress" }),
    failures,
    retry,
    h("p", {}, h("a", { href: "#/fleet" }, "The fleet")),
  );
  if (shown && report.status === "running") {
    clearTimeout(polling);
    polling = setTimeout(() => runPage(view, id), 1000);
  }
}

async function webhooksPage(view) {
  let endpoints;
  try {
    endpoints = await api("GET", "/admin/webhooks");
  } catch (err) {
    show(view, "Webhooks", message(err.message));
    return;
  }
  const rows = endpoints.map((e) =>
    h(
      "tr",
      {},
      h("td", { class: "num" }, h("a", { href: `#/webhooks/${e.id}` }, e.id)),
      h("td", {}, e.url),
      h("td", {}, e.events ? e.events.join(", ") : "all"),
      h("td", { class: "num" }, e.pending),
      h("td", { class: "num" }, e.dead),
    ),
  );
  show(
    view,
    "Webhooks",
    endpoints.length
      ? h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { "aria-label": "Endpoints" },
            h("thead", {}, h("tr", {}, h("th", { class: "num" }, "Id"), h("th", {}, "URL"), h("th", {}, "Events"), h("th", { class: "num" }, "Pending"), h("th", { class: "num" }, "Dead"))),
            h("tbody", {}, rows),
          ),
        )
      : h("p", {}, "No endpoint yet: add one with the command webhooks add URL (cargo run --release -- webhooks add URL from a checkout), or POST /admin/webhooks."),
  );
}

async function deliveriesPage(view, id, notice) {
  let list;
  try {
    list = await api("GET", `/admin/webhooks/${encodeURIComponent(id)}/deliveries?limit=100`);
  } catch (err) {
    show(view, `Endpoint ${id}`, message(err.status === 404 ? `There is no endpoint ${id}.` : err.message));
    return;
  }
  const rows = list.map((d) =>
    h("tr", {}, h("td", {}, when(d.created_at)), h("td", {}, d.type), h("td", {}, d.state), h("td", { class: "num" }, d.attempts), h("td", { class: "num" }, d.last_status ?? ""), h("td", { class: "error" }, d.last_error || "")),
  );
  const retry = list.some((d) => d.state === "dead")
    ? h("button", { type: "button", id: "retry-dead", onclick: async () => {
        try {
          const r = await api("POST", `/admin/webhooks/${encodeURIComponent(id)}/retry`);
          deliveriesPage(view, id, message(`${r.retried} dead deliveries are due again.`, "ok"));
        } catch (err) {
          deliveriesPage(view, id, message(err.message));
        }
      } }, "Send the dead ones again")
    : null;
  show(
    view,
    `Endpoint ${id}: latest deliveries`,
    notice || null,
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { "aria-label": "Deliveries" },
        h("thead", {}, h("tr", {}, h("th", {}, "Created"), h("th", {}, "Type"), h("th", {}, "State"), h("th", { class: "num" }, "Attempts"), h("th", { class: "num" }, "Last status"), h("th", {}, "Last error"))),
        h("tbody", {}, rows),
      ),
    ),
    retry,
    h("p", {}, h("a", { href: "#/webhooks" }, "All endpoints")),
  );
}


function nodeName(n) {
  return `${n.host}:${n.port}`;
}

async function clusterPage(view, notice) {
  let nodes;
  try {
    nodes = await api("GET", "/admin/cluster");
  } catch (err) {
    show(view, "Cluster", notice || null, message(err.status === 409 ? "This database is not a Citus coordinator." : err.message));
    return;
  }
  const table = h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { "aria-label": "Nodes" },
      h("thead", {}, h("tr", {}, h("th", {}, "Node"), h("th", {}, "Role"), h("th", {}, "Active"), h("th", { class: "num" }, "Tenants"), h("th", { class: "num" }, "Size"))),
      h("tbody", {}, nodes.map((n) => h("tr", {}, h("td", {}, nodeName(n)), h("td", {}, n.role), h("td", {}, n.active ? "yes" : "no"), h("td", { class: "num" }, n.tenants), h("td", { class: "num" }, bytes(n.bytes))))),
    ),
  );
  const workers = nodes.filter((n) => n.role === "worker");
  const tenant = h("input", { id: "move-tenant", name: "move-tenant", autocomplete: "off", required: true });
  const node = h("select", { id: "move-node", name: "move-node" }, workers.map((n) => h("option", { value: nodeName(n) }, nodeName(n))));
  const status = h("div", { id: "cluster-status", "aria-live": "polite" });
  const moveButton = h("button", { type: "submit" }, "Move");
  const move = h(
    "form",
    { class: "filters", onsubmit: async (e) => {
      e.preventDefault();
      moveButton.disabled = true;
      status.replaceChildren(message(`Moving ${tenant.value} to ${node.value}…`, "ok"));
      try {
        const m = await api("POST", `/admin/tenants/${encodeURIComponent(tenant.value)}/move`, { node: node.value });
        const how = m.mode === "online" ? "online" : "blocking its writes";
        clusterPage(view, message(m.from === m.to ? `${m.tenant} is on ${m.to} already.` : `Moved ${m.tenant} from ${m.from} to ${m.to} (${how}) in ${m.seconds.toFixed(1)} s.`, "ok"));
      } catch (err) {
        moveButton.disabled = false;
        status.replaceChildren(message(err.status === 404 && err.message === "no such tenant" ? `There is no tenant named ${tenant.value}.` : err.message));
      }
    } },
    h("label", { for: "move-tenant" }, "Tenant", tenant),
    h("label", { for: "move-node" }, "To node", node),
    moveButton,
  );
  const rebalance = h("button", { type: "button", id: "rebalance", onclick: async () => {
    rebalance.disabled = true;
    try {
      const r = await api("POST", "/admin/cluster/rebalance");
      if (r.job_id === null) clusterPage(view, message("The tenants are balanced already: nothing to move.", "ok"));
      else if (view === current) location.hash = `#/cluster/rebalance/${r.job_id}`;
    } catch (err) {
      rebalance.disabled = false;
      status.replaceChildren(message(err.message));
    }
  } }, "Rebalance the tenants");
  show(view, "Cluster", notice || null, table, h("h2", {}, "Move a tenant"), move, h("h2", {}, "Rebalance"), h("p", {}, "Citus moves whole tenants until each worker holds about as many."), rebalance, status);
}

async function rebalancePage(view, id) {
  let job;
  try {
    job = await api("GET", `/admin/cluster/rebalance/${encodeURIComponent(id)}`);
  } catch (err) {
    show(view, `Rebalance ${id}`, message(err.status === 404 ? `There is no rebalance ${id}.` : err.message));
    return;
  }
  const ended = ["finished", "failed", "cancelled"].includes(job.state);
  const shown = show(
    view,
    `Rebalance ${job.job_id}`,
    definitionList([
      ["State", job.state],
      ["Moves", `${job.done} of ${job.total}`],
    ]),
    h("progress", { max: Math.max(job.total, 1), value: job.done, "aria-label": "Progress" }),
    h("p", {}, h("a", { href: "#/cluster" }, "The cluster")),
  );
  if (shown && !ended) {
    clearTimeout(polling);
    polling = setTimeout(() => rebalancePage(view, id), 1000);
  }
}

// ---- routing (the hash: #/tenants?…, #/tenants/NAME, #/fleet, #/fleet/runs/ID,
// #/webhooks, #/webhooks/ID, #/cluster, #/cluster/rebalance/ID, #/audit?…) ----

function route() {
  clearTimeout(polling);
  if (!session) {
    signIn();
    return;
  }
  const view = ++current;
  const [path, search] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(search || "");
  for (const a of nav.querySelectorAll("a")) {
    if (path.startsWith(a.getAttribute("href").slice(1))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  let rest = "";
  const under = (prefix) => {
    if (!path.startsWith(prefix)) return false;
    try {
      rest = decodeURIComponent(path.slice(prefix.length));
    } catch {
      rest = path.slice(prefix.length);
    }
    return true;
  };
  if (path === "/audit") auditPage(view, params);
  else if (!session.admin) location.hash = "#/audit";
  else if (under("/tenants/")) tenantPage(view, rest);
  else if (path === "/fleet") fleetPage(view);
  else if (under("/fleet/runs/")) runPage(view, rest);
  else if (path === "/webhooks") webhooksPage(view);
  else if (under("/webhooks/")) deliveriesPage(view, rest);
  else if (path === "/cluster") clusterPage(view);
  else if (under("/cluster/rebalance/")) rebalancePage(view, rest);
  else tenantsPage(view, params);
}

window.addEventListener("hashchange", route);
route();
