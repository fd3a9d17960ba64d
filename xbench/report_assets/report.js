// xbench run report: sortable tables and gallery pages. Plain JavaScript, no dependencies.
(function () {
  "use strict";

  function cellKey(row, index) {
    var cell = row.cells[index];
    if (!cell) { return { num: NaN, text: "" }; }
    var raw = cell.getAttribute("data-value");
    var num = raw === null || raw === "" ? NaN : parseFloat(raw);
    return { num: num, text: cell.textContent.trim() };
  }

  // Numbers sort numerically (missing values last); other cells alphabetically.
  function compare(a, b, ascending) {
    var sign = ascending ? 1 : -1;
    var aNum = !isNaN(a.num), bNum = !isNaN(b.num);
    if (aNum && bNum) { return sign * (a.num - b.num); }
    if (aNum !== bNum) { return aNum ? -1 : 1; }
    return sign * a.text.localeCompare(b.text);
  }

  // The column headers are the last header row (a row of metric families may sit above it).
  function headerCells(table) {
    return table.tHead.rows[table.tHead.rows.length - 1].cells;
  }

  function sortTable(table, index, header) {
    var body = table.tBodies[0];
    var ascending = header.getAttribute("data-order") !== "asc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) { return compare(cellKey(r1, index), cellKey(r2, index), ascending); });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(headerCells(table), function (th) {
      th.removeAttribute("data-order");
      var mark = th.querySelector(".sorted");
      if (mark) { mark.textContent = ""; }
    });
    header.setAttribute("data-order", ascending ? "asc" : "desc");
    var own = header.querySelector(".sorted");
    if (own) { own.textContent = ascending ? " ▲" : " ▼"; }
  }

  function initSortable(table) {
    Array.prototype.forEach.call(headerCells(table), function (th, index) {
      th.title = "click to sort";
      th.addEventListener("click", function () { sortTable(table, index, th); });
    });
  }

  function initPager(gallery) {
    var pages = gallery.querySelectorAll("[data-page]");
    var count = parseInt(gallery.getAttribute("data-pages"), 10) || 1;
    var nav = gallery.querySelector(".pager");
    if (!nav || count <= 1) { return; }
    var label = nav.querySelector(".page-label");
    var current = 0;
    function show(page) {
      current = Math.max(0, Math.min(count - 1, page));
      Array.prototype.forEach.call(pages, function (el) {
        el.style.display = parseInt(el.getAttribute("data-page"), 10) === current ? "" : "none";
      });
      label.textContent = "page " + (current + 1) + " of " + count;
    }
    nav.querySelector(".prev").addEventListener("click", function () { show(current - 1); });
    nav.querySelector(".next").addEventListener("click", function () { show(current + 1); });
    nav.querySelector(".all").addEventListener("click", function () {
      Array.prototype.forEach.call(pages, function (el) { el.style.display = ""; });
      label.textContent = "all pages";
    });
    show(0);
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), initSortable);
    Array.prototype.forEach.call(document.querySelectorAll(".gallery"), initPager);
  });
})();
