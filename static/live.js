// The page's live table: the current documents of one collection (a live query), one row per
// document, kept in the order the map holds them; a changed row is refilled in place and
// highlighted for a moment, a row whose document left the set is removed.
//
// The DOM cost is bounded whatever the collection's size: at most MAX_SHOWN rows exist; the
// caption says when more documents are held than shown.

import { documentRow, fillDocumentRow } from "./render.js";

const MAX_SHOWN = 1000;
const HIGHLIGHT_MS = 1500; // how long a changed row stays marked (a timer: also without motion)

/**
 * Bind the live table to its elements; returns what the live query's callbacks call.
 *
 * @param {{rows: HTMLElement, count: HTMLElement, label: HTMLElement, capped: HTMLElement,
 *   empty: HTMLElement}} ui
 */
export function liveTable(ui) {
  const shown = new Map(); // key → row, for the documents that have one
  const timers = new WeakMap(); // row → its highlight timer
  let documents = new Map();
  ui.capped.querySelector(".cap").textContent = MAX_SHOWN.toLocaleString("en");

  /** The whole set is new (a snapshot, or emptied): draw every row again. */
  function snapshot(all) {
    documents = all;
    shown.clear();
    const rows = [];
    for (const [key, document] of all) {
      if (rows.length === MAX_SHOWN) break;
      const row = documentRow(key, document);
      shown.set(key, row);
      rows.push(row);
    }
    ui.rows.replaceChildren(...rows);
    ui.empty.textContent = "No documents match.";
    summarise();
  }

  /** One document changed, arrived or left. */
  function change({ key, document }, all) {
    documents = all;
    const row = shown.get(key);
    if (document === undefined) {
      if (row) {
        row.remove();
        shown.delete(key);
        fill();
      }
    } else if (row) {
      fillDocumentRow(row, document);
      highlight(row);
    } else if (shown.size < MAX_SHOWN) {
      highlight(append(key, document));
    }
    summarise();
  }

  function append(key, document) {
    const row = documentRow(key, document);
    shown.set(key, row);
    ui.rows.append(row);
    return row;
  }

  /** After a removal, show the next documents that had no room (in the map's order). */
  function fill() {
    if (shown.size >= Math.min(MAX_SHOWN, documents.size)) return;
    for (const [key, document] of documents) {
      if (!shown.has(key)) append(key, document);
      if (shown.size === MAX_SHOWN) return;
    }
  }

  /** Mark a row for a moment. Its cells are new (refilled), so a fade under way starts over
   * without forcing a layout: one forced per change cost 21 ms a change with 1,000 rows. */
  function highlight(row) {
    clearTimeout(timers.get(row));
    row.classList.add("changed");
    timers.set(row, setTimeout(() => row.classList.remove("changed"), HIGHLIGHT_MS));
  }

  function summarise() {
    const n = documents.size;
    ui.count.textContent = n.toLocaleString("en");
    ui.label.textContent = n === 1 ? "document" : "documents";
    ui.capped.hidden = n <= MAX_SHOWN;
    ui.empty.hidden = n > 0;
  }

  /** Before the first snapshot of a (new) live query. */
  function loading() {
    documents = new Map();
    shown.clear();
    ui.rows.replaceChildren();
    summarise();
    ui.empty.textContent = "Loading the documents…";
    ui.empty.hidden = false;
  }

  return { snapshot, change, loading };
}
