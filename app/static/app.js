// xmodal web page: text and image search, image-to-text, bulk upload, browsing the collection
// (newest first) and a detail view per image (metadata, nearest texts, delete).
// Plain ES module, no build step, no third-party code. Talks only to this server's /v1 API.
// Server data is always inserted with textContent / attributes, never as HTML.

const KEY_STORAGE = "xmodal.apiKey";
const UPLOAD_CONCURRENCY = 3;
const TEXTS_PER_REQUEST = 100;
const INFO_RETRY_MS = 3000;
const DETAIL_TEXTS = 5;
// Formats a browser shows itself; others (HEIC, TIFF) are shown through their JPEG thumbnail.
const SHOWABLE = new Set(["image/jpeg", "image/png", "image/gif", "image/webp", "image/avif", "image/bmp"]);

const $ = (sel) => document.querySelector(sel);

const el = {
  info: $("#info"),
  authForm: $("#auth-form"),
  apiKey: $("#api-key"),
  apiKeyCancel: $("#api-key-cancel"),
  error: $("#error"),
  errorText: $("#error-text"),
  errorClose: $("#error-close"),
  searchForm: $("#search-form"),
  query: $("#query"),
  mode: $("#mode"),
  k: $("#k"),
  rerankLabel: $("#rerank-label"),
  rerank: $("#rerank-toggle"),
  filter: $("#filter"),
  takenFrom: $("#taken-from"),
  takenTo: $("#taken-to"),
  album: $("#album"),
  dropZone: $("#drop-zone"),
  imageInput: $("#image-input"),
  queryImage: $("#query-image"),
  queryImagePreview: $("#query-image-preview"),
  queryImageName: $("#query-image-name"),
  queryImageClear: $("#query-image-clear"),
  resultsHeading: $("#results-heading"),
  status: $("#status"),
  results: $("#results"),
  loadMore: $("#load-more"),
  uploadDrop: $("#upload-drop"),
  uploadInput: $("#upload-input"),
  uploadMetadata: $("#upload-metadata"),
  uploadSummary: $("#upload-summary"),
  uploadProgress: $("#upload-progress"),
  uploadFailuresBox: $("#upload-failures-box"),
  uploadFailures: $("#upload-failures"),
  uploadList: $("#upload-list"),
  textsForm: $("#texts-form"),
  textsInput: $("#texts-input"),
  textsStatus: $("#texts-status"),
  detail: $("#detail"),
  detailTitle: $("#detail-title"),
  detailClose: $("#detail-close"),
  detailImg: $("#detail-img"),
  detailNote: $("#detail-note"),
  detailMeta: $("#detail-meta"),
  detailTexts: $("#detail-texts"),
  detailMore: $("#detail-more"),
  detailOriginal: $("#detail-original"),
  detailDelete: $("#detail-delete"),
  detailConfirm: $("#detail-confirm"),
  detailConfirmYes: $("#detail-confirm-yes"),
  detailConfirmNo: $("#detail-confirm-no"),
  imageTpl: $("#image-result-tpl"),
  textTpl: $("#text-result-tpl"),
};

const state = {
  apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
  info: null,
  // What the results grid shows: {kind: "browse"} | {kind: "text", query}
  // | {kind: "image", file?, imageId?, label}. Image queries are re-run when the mode changes.
  view: { kind: "browse" },
  viewSeq: 0, // answers to an older view are dropped
  browseAfter: null,
  resultUrls: [], // object URLs made for the current results (revoked on re-render)
  queryPreviewUrl: null,
  keyPrompt: null, // one shared prompt for every request that got 401
  uploads: { queue: [], active: 0, total: 0, ok: 0, failed: 0 },
  detail: null, // {id, name, seq} of the image the detail view shows
  detailSeq: 0,
  detailUrls: [], // object URLs of the detail view (revoked when it closes)
};

// ---------------------------------------------------------------------------------------------
// API access

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  return state.apiKey ? { Authorization: `Bearer ${state.apiKey}` } : {};
}

function fallbackMessage(status) {
  switch (status) {
    case 401: return "An API key is needed to use this server.";
    case 404: return "Not found.";
    case 413: return "Too large: the server refused a file or request of this size.";
    case 415: return "Not an image this server can read (JPEG, PNG, GIF, WebP, AVIF, HEIC, BMP, TIFF).";
    case 422: return "The server could not use that input.";
    case 503: return "The server is busy or still starting.";
    default: return status >= 500 ? `Server error (${status}). Please try again.` : `Request failed (${status}).`;
  }
}

// Turns a non-2xx answer into an ApiError carrying the server's error.message when there is one.
function toApiError(status, bodyText, retryAfter) {
  let code = "http_" + status;
  let message = "";
  try {
    const body = JSON.parse(bodyText);
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || "";
    }
  } catch {
    // not JSON: keep the fallback
  }
  if (!message || (status >= 500 && status !== 503)) message = fallbackMessage(status);
  if (status === 503 && retryAfter) {
    message = `${message.replace(/\s+$/, "")}${/[.!?]$/.test(message.trim()) ? "" : "."} Try again in ${retryAfter} s.`;
  }
  return new ApiError(status, code, message);
}

// Asks for the API key once, however many requests are waiting on it.
function needKey() {
  if (!state.keyPrompt) {
    state.keyPrompt = new Promise((resolve, reject) => {
      state.keyPromptResolvers = { resolve, reject };
    });
    el.authForm.hidden = false;
    el.apiKey.value = "";
    el.apiKey.focus();
  }
  return state.keyPrompt;
}

function settleKeyPrompt(key) {
  const resolvers = state.keyPromptResolvers;
  state.keyPrompt = null;
  state.keyPromptResolvers = null;
  el.authForm.hidden = true;
  if (!resolvers) {
    // The form was re-opened after a rejected key: retry what the page shows.
    if (key) refreshInfo().then((ok) => ok && rerunView());
    return;
  }
  if (key) resolvers.resolve(key);
  else resolvers.reject(new ApiError(401, "unauthorized", "An API key is needed to use this server."));
}

function forgetKey() {
  state.apiKey = "";
  sessionStorage.removeItem(KEY_STORAGE);
}

// Runs send(headers) -> {status, text, retryAfter}; on 401 asks for the key and retries once.
async function withAuth(send) {
  for (let attempt = 0; ; attempt++) {
    const keyUsed = state.apiKey;
    const res = await send(authHeaders());
    if (res.status === 401) {
      if (state.apiKey !== keyUsed && attempt < 2) continue; // a key arrived meanwhile
      if (attempt === 0) {
        await needKey();
        continue;
      }
      forgetKey();
      el.authForm.hidden = false; // offer to enter another key, without blocking anything
      throw new ApiError(401, "unauthorized", "The API key was not accepted.");
    }
    if (res.status < 200 || res.status >= 300) throw toApiError(res.status, res.text, res.retryAfter);
    if (res.status === 204 || !res.text) return null;
    try {
      return JSON.parse(res.text);
    } catch {
      throw new ApiError(res.status, "bad_response", "The server sent an answer this page cannot read.");
    }
  }
}

// fetch-based JSON call. opts: {method, json, form}
async function api(path, opts = {}) {
  return withAuth(async (headers) => {
    const init = { method: opts.method || "GET", headers: { Accept: "application/json", ...headers } };
    if (opts.json !== undefined) {
      init.method = opts.method || "POST";
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(opts.json);
    } else if (opts.form) {
      init.method = opts.method || "POST";
      init.body = opts.form;
    }
    let res;
    try {
      res = await fetch(path, init);
    } catch {
      throw new ApiError(0, "network", "Cannot reach the server. Is it running?");
    }
    return { status: res.status, text: await res.text(), retryAfter: res.headers.get("Retry-After") };
  });
}

// XMLHttpRequest-based multipart POST, for upload progress (fetch has none).
function xhrPost(path, form, onProgress) {
  return withAuth((headers) => new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Accept", "application/json");
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (ev) => {
      if (ev.lengthComputable) onProgress(ev.loaded / ev.total);
    };
    xhr.onload = () => resolve({
      status: xhr.status, text: xhr.responseText, retryAfter: xhr.getResponseHeader("Retry-After"),
    });
    xhr.onerror = () => reject(new ApiError(0, "network", "Cannot reach the server. Is it running?"));
    xhr.send(form);
  }));
}

// ---------------------------------------------------------------------------------------------
// Messages

function showError(err) {
  const message = err instanceof ApiError || err instanceof Error ? err.message : String(err);
  el.errorText.textContent = message;
  el.error.hidden = false;
  if (!(err instanceof ApiError)) console.error(err);
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

function setStatus(text) {
  el.status.textContent = text;
}

// ---------------------------------------------------------------------------------------------
// Server info

function formatCount(n, word) {
  const num = Number(n) || 0;
  return `${num.toLocaleString()} ${word}${num === 1 ? "" : "s"}`;
}

async function refreshInfo() {
  try {
    const info = await api("/v1/info");
    state.info = info;
    const m = info.model || {};
    const c = info.counts || {};
    const parts = [
      `Model ${m.name || "?"}${m.pretrained ? ` (${m.pretrained})` : ""}`,
      [m.device, m.precision].filter(Boolean).join(" "),
      formatCount(c.images, "image"),
      formatCount(c.texts, "text"),
    ].filter(Boolean);
    el.info.textContent = parts.join(" · ");
    el.info.title = m.fingerprint ? `fingerprint ${m.fingerprint} · version ${info.version || "?"}` : "";
    el.rerankLabel.hidden = !m.has_reranker;
    if (!m.has_reranker) el.rerank.checked = false;
    if (state.viewSeq === 0) browse(); // first answer: show the collection
    return true;
  } catch (err) {
    if (err.status === 503 || err.status === 0) {
      el.info.textContent = err.status === 503 ? "Server is starting…" : "Server unreachable, retrying…";
      setTimeout(refreshInfo, INFO_RETRY_MS);
    } else {
      el.info.textContent = "Server info unavailable.";
      showError(err);
    }
    return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Results

function revokeResultUrls() {
  for (const url of state.resultUrls) URL.revokeObjectURL(url);
  state.resultUrls = [];
}

// Images under /v1 need the Authorization header when a key is in use, which <img src> cannot
// send: then the bytes are fetched and shown through an object URL.
async function authedObjectUrl(url) {
  const res = await fetch(url, { headers: authHeaders() });
  if (!res.ok) throw toApiError(res.status, await res.text(), res.headers.get("Retry-After"));
  const objectUrl = URL.createObjectURL(await res.blob());
  state.resultUrls.push(objectUrl);
  return objectUrl;
}

function setImage(img, url) {
  img.addEventListener("error", () => img.classList.add("broken"), { once: true });
  if (!state.apiKey) {
    img.src = url;
    return;
  }
  authedObjectUrl(url).then((u) => { img.src = u; }, () => img.classList.add("broken"));
}

function formatScore(x) {
  return typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–";
}

function fillScores(node, r) {
  const box = node.querySelector(".scores");
  box.replaceChildren();
  if (typeof r.score === "number") {
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = `score ${formatScore(r.score)}`;
    box.append(s);
  }
  if (r.rerank_score !== null && r.rerank_score !== undefined) {
    const s = document.createElement("span");
    s.className = "rerank-score";
    s.textContent = `re-rank ${formatScore(r.rerank_score)}`;
    box.append(s);
  }
  if (!box.childElementCount) box.remove();
}

function fillMetadata(node, metadata) {
  const dl = node.querySelector(".metadata");
  const all = metadata && typeof metadata === "object" ? Object.entries(metadata) : [];
  // The size read from the file is for filters and the detail view, not for every card.
  const entries = all.filter(([key]) => key !== "width" && key !== "height");
  if (!entries.length) {
    dl.remove();
    return;
  }
  for (const [key, value] of entries.slice(0, 8)) {
    const dt = document.createElement("dt");
    dt.textContent = FACT_LABELS[key] || key;
    const dd = document.createElement("dd");
    let text = formatValue(key, value);
    if (text.length > 120) text = text.slice(0, 119) + "…";
    dd.textContent = text;
    dd.title = text;
    dl.append(dt, dd);
  }
}

function imageResultNode(r) {
  const node = el.imageTpl.content.firstElementChild.cloneNode(true);
  const id = String(r.id);
  const name = r.filename || `image ${id}`;
  node.dataset.id = id;
  node.dataset.testid = "result";
  const link = node.querySelector(".thumb-link");
  const url = r.url || `/v1/images/${encodeURIComponent(id)}/content`;
  link.href = url;
  link.target = "_blank";
  link.rel = "noopener";
  link.setAttribute("aria-label", `Details of ${name}`);
  link.addEventListener("click", (ev) => {
    // A modified click opens the original in a tab (without a key: with one it would be 401).
    if (!state.apiKey && (ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button !== 0)) return;
    ev.preventDefault();
    openDetail(id, name);
  });
  const img = node.querySelector(".thumb");
  img.alt = name;
  setImage(img, r.thumbnail_url || `/v1/images/${encodeURIComponent(id)}/thumbnail`);
  fillScores(node, r);
  const fn = node.querySelector(".filename");
  fn.textContent = name;
  fn.title = name;
  fillMetadata(node, r.metadata);
  const more = node.querySelector(".more-like-this");
  more.dataset.id = id;
  more.setAttribute("aria-label", `More like ${name}`);
  more.addEventListener("click", () => {
    el.mode.value = "images";
    runImageQuery({ imageId: id, label: name });
  });
  const texts = node.querySelector(".find-texts");
  texts.dataset.id = id;
  texts.setAttribute("aria-label", `Texts matching ${name}`);
  texts.addEventListener("click", () => {
    el.mode.value = "texts";
    runImageQuery({ imageId: id, label: name });
  });
  return node;
}

function textResultNode(r) {
  const node = el.textTpl.content.firstElementChild.cloneNode(true);
  node.dataset.id = String(r.id);
  node.dataset.testid = "result";
  node.tabIndex = 0; // reachable by keyboard like the image results
  node.querySelector(".text").textContent = r.text ?? "";
  fillScores(node, r);
  fillMetadata(node, r.metadata);
  return node;
}

function renderResults(items, kind, { append = false } = {}) {
  if (!append) {
    revokeResultUrls();
    el.results.replaceChildren();
  }
  el.results.dataset.kind = kind;
  const frag = document.createDocumentFragment();
  for (const r of items) frag.append(kind === "texts" ? textResultNode(r) : imageResultNode(r));
  el.results.append(frag);
}

// ---------------------------------------------------------------------------------------------
// Detail view: the image large, its metadata, its nearest texts, more like this, delete.

const FACT_LABELS = { taken_at: "taken", gps: "position" };

function formatValue(key, value) {
  if (key === "gps" && value && typeof value === "object" && "lat" in value && "lon" in value) {
    return `${Number(value.lat).toFixed(5)}, ${Number(value.lon).toFixed(5)}`;
  }
  if (key === "taken_at" && typeof value === "string") return value.replace("T", " ");
  return typeof value === "string" ? value : JSON.stringify(value);
}

function addFact(dl, label, text) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.textContent = text;
  dl.append(dt, dd);
}

function fillDetailFacts(item) {
  const dl = el.detailMeta;
  dl.replaceChildren();
  const meta = item.metadata && typeof item.metadata === "object" ? item.metadata : {};
  if (item.width && item.height) addFact(dl, "size", `${item.width} × ${item.height}`);
  if (typeof item.bytes === "number") addFact(dl, "file", `${formatBytes(item.bytes)}${item.mime ? `, ${item.mime}` : ""}`);
  if (typeof item.created === "number") addFact(dl, "added", new Date(item.created * 1000).toLocaleString());
  for (const [key, value] of Object.entries(meta)) {
    if (key === "width" || key === "height") continue; // shown as size
    addFact(dl, FACT_LABELS[key] || key, formatValue(key, value));
  }
}

function detailObjectUrl(url) {
  return fetch(url, { headers: authHeaders() }).then(async (res) => {
    if (!res.ok) throw toApiError(res.status, await res.text(), res.headers.get("Retry-After"));
    const objectUrl = URL.createObjectURL(await res.blob());
    state.detailUrls.push(objectUrl);
    return objectUrl;
  });
}

async function fillDetailTexts(id, seq) {
  el.detailTexts.replaceChildren();
  const busy = document.createElement("li");
  busy.className = "status";
  busy.textContent = "Looking…";
  el.detailTexts.append(busy);
  const form = new FormData();
  form.append("image_id", id);
  form.append("k", String(DETAIL_TEXTS));
  let items = [];
  let note = "";
  try {
    items = (await api("/v1/search/image-to-text", { form })).results || [];
    if (!items.length) note = "No texts in the collection yet.";
  } catch (err) {
    note = err.message;
  }
  if (seq !== state.detailSeq) return;
  el.detailTexts.replaceChildren();
  for (const t of items) {
    const li = document.createElement("li");
    const text = document.createElement("span");
    text.textContent = t.text ?? "";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = ` ${formatScore(t.score)}`;
    li.append(text, score);
    el.detailTexts.append(li);
  }
  if (note) {
    const li = document.createElement("li");
    li.className = "status";
    li.textContent = note;
    el.detailTexts.append(li);
  }
}

async function openDetail(id, name) {
  const seq = ++state.detailSeq;
  state.detail = { id, name };
  el.detailTitle.textContent = name;
  el.detailConfirm.hidden = true;
  el.detailDelete.hidden = false;
  el.detailMeta.replaceChildren();
  el.detailNote.hidden = true;
  el.detailImg.removeAttribute("src");
  el.detailImg.alt = name;
  if (!el.detail.open) el.detail.showModal();
  const base = `/v1/images/${encodeURIComponent(id)}`;
  fillDetailTexts(id, seq);
  try {
    const item = await api(base);
    if (seq !== state.detailSeq) return;
    fillDetailFacts(item);
    const showable = SHOWABLE.has(item.mime);
    const url = showable ? item.url || `${base}/content` : item.thumbnail_url || `${base}/thumbnail`;
    if (!showable) {
      el.detailNote.textContent = `Preview: the original (${item.mime || "unknown type"}) is not shown by browsers.`;
      el.detailNote.hidden = false;
    }
    el.detailOriginal.hidden = Boolean(state.apiKey); // a plain link cannot send the key
    el.detailOriginal.href = item.url || `${base}/content`;
    el.detailImg.src = state.apiKey ? await detailObjectUrl(url) : url;
  } catch (err) {
    if (seq !== state.detailSeq) return;
    closeDetail();
    showError(err);
  }
}

function closeDetail() {
  state.detailSeq++;
  state.detail = null;
  if (el.detail.open) el.detail.close();
}

function releaseDetail() {
  for (const url of state.detailUrls) URL.revokeObjectURL(url);
  state.detailUrls = [];
  el.detailImg.removeAttribute("src");
}

async function deleteShown() {
  const shown = state.detail;
  if (!shown) return;
  el.detailConfirmYes.disabled = true;
  try {
    await api(`/v1/images/${encodeURIComponent(shown.id)}`, { method: "DELETE" });
    closeDetail();
    for (const node of el.results.querySelectorAll(".result")) {
      if (node.dataset.id === shown.id) node.remove();
    }
    setStatus(`Deleted ${shown.name}.`);
    refreshInfo();
  } catch (err) {
    closeDetail();
    showError(err);
  } finally {
    el.detailConfirmYes.disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------
// Queries

function readK() {
  return Number.parseInt(el.k.value, 10) || 24;
}

// The day after an <input type="date"> value ("2023-12-31" -> "2024-01-01").
function nextDay(day) {
  const d = new Date(`${day}T00:00:00Z`);
  d.setUTCDate(d.getUTCDate() + 1);
  return d.toISOString().slice(0, 10);
}

// The date-range and album inputs as filter conditions (taken_at is an ISO 8601 string, so a
// day range is [from, the day after to)).
function quickFilter() {
  const out = {};
  const from = el.takenFrom.value;
  const to = el.takenTo.value;
  if (from || to) {
    out.taken_at = {};
    if (from) out.taken_at.$gte = from;
    if (to) out.taken_at.$lt = nextDay(to);
  }
  const album = el.album.value.trim();
  if (album) out.album = album;
  return out;
}

// The filter box merged with the quick filters (which win on the same key); null when empty.
function readFilter() {
  const raw = el.filter.value.trim();
  let value = {};
  if (raw) {
    try {
      value = JSON.parse(raw);
    } catch {
      throw new ApiError(0, "client", "The metadata filter is not valid JSON.");
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) {
      throw new ApiError(0, "client", "The metadata filter must be a JSON object, e.g. {\"album\": \"trip\"}.");
    }
  }
  const merged = { ...value, ...quickFilter() };
  return Object.keys(merged).length ? merged : null;
}

function rerankOn() {
  return !el.rerankLabel.hidden && el.rerank.checked;
}

function beginView(view, heading) {
  state.view = view;
  const seq = ++state.viewSeq;
  clearError();
  el.resultsHeading.textContent = heading;
  el.results.setAttribute("aria-busy", "true");
  el.loadMore.hidden = true;
  setStatus("Searching…");
  return seq;
}

function endView(seq) {
  if (seq === state.viewSeq) el.results.removeAttribute("aria-busy");
}

// A query that failed shows no results: those on screen answer the previous query, and would
// sit under the new heading as if they matched this one.
function failView(err) {
  revokeResultUrls();
  el.results.replaceChildren();
  setStatus("");
  showError(err);
}

function searchSummary(res, reranked) {
  const n = res.results.length;
  const parts = [n ? formatCount(n, "result") : "No results"];
  if (typeof res.took_ms === "number") parts.push(`${Math.round(res.took_ms)} ms`);
  if (reranked) parts.push("re-ranked");
  return parts.join(" · ");
}

async function runTextQuery(query) {
  if (el.mode.value !== "images") el.mode.value = "images"; // text queries always find images
  syncModeUi();
  hideQueryPreview();
  const seq = beginView({ kind: "text", query }, `Images matching “${query}”`);
  try {
    const rerank = rerankOn();
    const body = { query, k: readK(), filter: readFilter(), rerank };
    const res = await api("/v1/search/text", { json: body });
    if (seq !== state.viewSeq) return;
    renderResults(res.results || [], "images");
    setStatus(searchSummary(res, rerank));
  } catch (err) {
    if (seq !== state.viewSeq) return;
    failView(err);
  } finally {
    endView(seq);
  }
}

// query: {file?: File, imageId?: string, label: string}; the mode select picks images or texts.
async function runImageQuery(query) {
  syncModeUi();
  const texts = el.mode.value === "texts";
  const heading = `${texts ? "Texts matching" : "Images like"} ${query.label}`;
  const seq = beginView({ kind: "image", ...query }, heading);
  if (query.imageId !== undefined) hideQueryPreview();
  try {
    const form = new FormData();
    if (query.file) form.append("file", query.file, query.file.name || "query");
    else form.append("image_id", String(query.imageId));
    form.append("k", String(readK()));
    let path;
    let rerank = false;
    if (texts) {
      rerank = rerankOn();
      form.append("rerank", rerank ? "true" : "false");
      path = "/v1/search/image-to-text";
    } else {
      const filter = readFilter();
      if (filter) form.append("filter", JSON.stringify(filter));
      path = "/v1/search/image";
    }
    const res = await api(path, { form });
    if (seq !== state.viewSeq) return;
    renderResults(res.results || [], texts ? "texts" : "images");
    setStatus(searchSummary(res, rerank));
    if (texts && !res.results?.length) setStatus("No texts yet: add some under “Add texts”.");
  } catch (err) {
    if (seq !== state.viewSeq) return;
    failView(err);
  } finally {
    endView(seq);
  }
}

async function browse({ more = false } = {}) {
  let seq;
  if (more) {
    seq = state.viewSeq;
  } else {
    seq = beginView({ kind: "browse" }, "Collection, newest first");
    state.browseAfter = null;
    hideQueryPreview();
  }
  try {
    const params = new URLSearchParams({ limit: String(readK()), order: "newest" });
    if (more && state.browseAfter !== null) params.set("after", String(state.browseAfter));
    const res = await api(`/v1/images?${params}`);
    if (seq !== state.viewSeq) return;
    const items = res.items || [];
    renderResults(items, "images", { append: more });
    state.browseAfter = res.next_after ?? null;
    el.loadMore.hidden = state.browseAfter === null;
    const total = typeof res.total === "number" ? res.total : items.length;
    const shown = el.results.childElementCount;
    setStatus(total
      ? `${shown < total ? `${shown.toLocaleString()} of ` : ""}${formatCount(total, "image")} in the collection`
      : "No images yet: add some below.");
  } catch (err) {
    if (seq !== state.viewSeq) return;
    if (!more) {
      revokeResultUrls();
      el.results.replaceChildren();
    }
    setStatus("");
    if (err.status === 503) setStatus(err.message);
    else showError(err);
  } finally {
    endView(seq);
  }
}

function rerunView() {
  const v = state.view;
  if (v.kind === "text") runTextQuery(v.query);
  else if (v.kind === "image") runImageQuery({ file: v.file, imageId: v.imageId, label: v.label });
  else browse();
}

function syncModeUi() {
  const texts = el.mode.value === "texts";
  el.query.placeholder = texts
    ? "Image-to-text: drop an image below (typing here searches images)"
    : "Describe an image, e.g. “a red bicycle by a wall”";
  el.dropZone.classList.toggle("texts-mode", texts);
}

// ---------------------------------------------------------------------------------------------
// Query image (drop, pick, paste)

function showQueryPreview(file) {
  hideQueryPreview();
  state.queryPreviewUrl = URL.createObjectURL(file);
  el.queryImagePreview.src = state.queryPreviewUrl;
  el.queryImageName.textContent = file.name || "pasted image";
  el.queryImage.hidden = false;
}

function hideQueryPreview() {
  if (state.queryPreviewUrl) URL.revokeObjectURL(state.queryPreviewUrl);
  state.queryPreviewUrl = null;
  el.queryImage.hidden = true;
  el.queryImagePreview.removeAttribute("src");
}

function searchByFile(file) {
  if (!file) return;
  showQueryPreview(file);
  runImageQuery({ file, label: file.name || "pasted image" });
}

function wireDropTarget(zone, onFiles) {
  zone.addEventListener("dragenter", (ev) => {
    ev.preventDefault();
    zone.classList.add("dragover");
  });
  zone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
    zone.classList.add("dragover");
  });
  zone.addEventListener("dragleave", (ev) => {
    if (!zone.contains(ev.relatedTarget)) zone.classList.remove("dragover");
  });
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("dragover");
    const files = [...(ev.dataTransfer?.files || [])];
    if (files.length) onFiles(files);
  });
}

// ---------------------------------------------------------------------------------------------
// Uploads: one file per request, at most UPLOAD_CONCURRENCY at a time, a row per file.

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(0)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

function readUploadMetadata() {
  const raw = el.uploadMetadata.value.trim();
  if (!raw) return null;
  let value;
  try {
    value = JSON.parse(raw);
  } catch {
    throw new ApiError(0, "client", "The upload metadata is not valid JSON.");
  }
  if (!value || typeof value !== "object" || Array.isArray(value)) {
    throw new ApiError(0, "client", "The upload metadata must be a JSON object.");
  }
  return raw;
}

function uploadRow(file) {
  const li = document.createElement("li");
  li.className = "upload-row upload-pending";
  li.dataset.filename = file.name;
  li.dataset.testid = "upload-row";
  const name = document.createElement("span");
  name.className = "upload-name";
  name.textContent = file.name;
  name.title = file.name;
  const size = document.createElement("span");
  size.className = "upload-size";
  size.textContent = formatBytes(file.size);
  const progress = document.createElement("progress");
  progress.max = 1;
  progress.value = 0;
  progress.setAttribute("aria-label", `Upload progress of ${file.name}`);
  const msg = document.createElement("span");
  msg.className = "upload-msg";
  msg.textContent = "Waiting…";
  li.append(name, size, progress, msg);
  return { li, progress, msg };
}

function updateUploadSummary() {
  const u = state.uploads;
  const done = u.ok + u.failed;
  el.uploadProgress.hidden = u.total === 0;
  el.uploadProgress.max = Math.max(u.total, 1);
  el.uploadProgress.value = done;
  if (done < u.total) {
    el.uploadSummary.textContent = `Uploading… ${done} of ${u.total} done` + (u.failed ? `, ${u.failed} failed` : "");
  } else {
    el.uploadSummary.textContent =
      `${formatCount(u.total, "file")}: ${u.ok} indexed` + (u.failed ? `, ${u.failed} failed` : "");
  }
}

function enqueueUploads(files) {
  if (!files.length) return;
  let metadata;
  try {
    metadata = readUploadMetadata();
  } catch (err) {
    showError(err);
    return;
  }
  const u = state.uploads;
  if (u.active === 0 && u.queue.length === 0) {
    Object.assign(u, { total: 0, ok: 0, failed: 0 });
    el.uploadFailures.replaceChildren();
    el.uploadFailuresBox.hidden = true;
  }
  for (const file of files) {
    const row = uploadRow(file);
    el.uploadList.prepend(row.li);
    u.queue.push({ file, metadata, row });
    u.total += 1;
  }
  updateUploadSummary();
  pumpUploads();
}

function pumpUploads() {
  const u = state.uploads;
  while (u.active < UPLOAD_CONCURRENCY && u.queue.length) {
    const job = u.queue.shift();
    u.active += 1;
    uploadOne(job).finally(() => {
      u.active -= 1;
      updateUploadSummary();
      if (u.active === 0 && u.queue.length === 0) uploadsFinished();
      else pumpUploads();
    });
  }
}

function uploadRefused(row, message) {
  row.li.classList.remove("upload-pending");
  row.li.classList.add("upload-error");
  row.progress.remove();
  row.msg.textContent = message;
  state.uploads.failed += 1;
  // Failures are also listed together above the rows: in a batch of hundreds they stay in view.
  const li = document.createElement("li");
  li.textContent = message.startsWith(row.li.dataset.filename) ? message : `${row.li.dataset.filename}: ${message}`;
  el.uploadFailures.append(li);
  el.uploadFailuresBox.hidden = false;
}

async function uploadOne({ file, metadata, row }) {
  const limit = state.info?.limits?.max_upload_bytes;
  if (typeof limit === "number" && file.size > limit) {
    // Known limit (from /v1/info): refuse here instead of sending the bytes for a 413.
    uploadRefused(row, `${file.name}: too large (${formatBytes(file.size)}; the limit is ${formatBytes(limit)})`);
    return;
  }
  row.msg.textContent = "Uploading…";
  const form = new FormData();
  form.append("files", file, file.name);
  if (metadata) form.append("metadata", metadata);
  try {
    const res = await xhrPost("/v1/images", form, (fraction) => {
      row.progress.value = fraction;
      if (fraction >= 1) row.msg.textContent = "Indexing…";
    });
    const item = res?.items?.[0];
    row.progress.value = 1;
    row.li.classList.remove("upload-pending");
    row.li.classList.add("upload-ok");
    if (item) {
      row.li.dataset.id = String(item.id);
      row.msg.textContent = item.duplicate
        ? `Already in the collection (#${item.id})`
        : `Indexed (#${item.id})`;
    } else {
      row.msg.textContent = "Indexed";
    }
    state.uploads.ok += 1;
  } catch (err) {
    uploadRefused(row, err.message || "Upload failed.");
  }
}

function uploadsFinished() {
  refreshInfo();
  if (state.view.kind === "browse") browse();
}

// ---------------------------------------------------------------------------------------------
// Texts for image-to-text search

async function addTexts(ev) {
  ev.preventDefault();
  const lines = el.textsInput.value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!lines.length) {
    el.textsStatus.textContent = "Nothing to add.";
    return;
  }
  clearError();
  let added = 0;
  try {
    for (let i = 0; i < lines.length; i += TEXTS_PER_REQUEST) {
      const items = lines.slice(i, i + TEXTS_PER_REQUEST).map((text) => ({ text, metadata: {} }));
      el.textsStatus.textContent = `Adding… ${added} of ${lines.length}`;
      const res = await api("/v1/texts", { json: { items } });
      added += res?.items?.length ?? items.length;
    }
    el.textsStatus.textContent = `Added ${formatCount(added, "text")}.`;
    el.textsInput.value = "";
  } catch (err) {
    el.textsStatus.textContent = added ? `Added ${formatCount(added, "text")} before an error.` : "";
    showError(err);
  }
  refreshInfo();
}

// ---------------------------------------------------------------------------------------------
// Wiring

function wire() {
  el.searchForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const query = el.query.value.trim();
    if (!query) {
      browse();
      return;
    }
    runTextQuery(query);
  });

  el.mode.addEventListener("change", () => {
    syncModeUi();
    if (state.view.kind === "image") rerunView();
    else if (el.mode.value === "texts") {
      setStatus("Drop or choose an image, or press “Texts” on a result, to find matching texts.");
    }
  });
  el.rerank.addEventListener("change", () => {
    if (state.view.kind === "text" || (state.view.kind === "image" && el.mode.value === "texts")) rerunView();
  });
  el.k.addEventListener("change", rerunView);
  for (const input of [el.takenFrom, el.takenTo, el.album]) {
    input.addEventListener("change", () => {
      if (state.view.kind === "text" || (state.view.kind === "image" && el.mode.value === "images")) rerunView();
    });
  }

  el.imageInput.addEventListener("change", () => {
    const file = el.imageInput.files?.[0];
    el.imageInput.value = ""; // picking the same file again still fires change
    searchByFile(file);
  });
  wireDropTarget(el.dropZone, (files) => searchByFile(files[0]));
  el.queryImageClear.addEventListener("click", () => {
    el.query.value = "";
    browse();
  });
  document.addEventListener("paste", (ev) => {
    const file = [...(ev.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (!file) return;
    ev.preventDefault();
    searchByFile(file);
  });
  // A file dropped outside the drop zones must not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());

  el.uploadInput.addEventListener("change", () => {
    const files = [...(el.uploadInput.files || [])];
    el.uploadInput.value = "";
    enqueueUploads(files);
  });
  wireDropTarget(el.uploadDrop, enqueueUploads);

  el.loadMore.addEventListener("click", () => browse({ more: true }));
  el.textsForm.addEventListener("submit", addTexts);

  el.authForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = el.apiKey.value.trim();
    if (!key) return;
    state.apiKey = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    el.apiKey.value = "";
    clearError();
    settleKeyPrompt(key);
  });
  el.apiKeyCancel.addEventListener("click", () => settleKeyPrompt(null));

  el.errorClose.addEventListener("click", clearError);
  el.detail.addEventListener("click", (ev) => {
    if (ev.target === el.detail) closeDetail(); // click on the backdrop
  });
  el.detail.addEventListener("close", () => {
    state.detailSeq++;
    state.detail = null;
    releaseDetail();
  });
  el.detailClose.addEventListener("click", closeDetail);
  el.detailMore.addEventListener("click", () => {
    const shown = state.detail;
    if (!shown) return;
    closeDetail();
    el.mode.value = "images";
    runImageQuery({ imageId: shown.id, label: shown.name });
  });
  el.detailDelete.addEventListener("click", () => {
    el.detailConfirm.hidden = false;
    el.detailDelete.hidden = true;
    el.detailConfirmNo.focus();
  });
  el.detailConfirmNo.addEventListener("click", () => {
    el.detailConfirm.hidden = true;
    el.detailDelete.hidden = false;
    el.detailDelete.focus();
  });
  el.detailConfirmYes.addEventListener("click", deleteShown);
}

async function start() {
  wire();
  syncModeUi();
  await refreshInfo(); // retries until the server is ready, then shows the collection
}

start();
