// CSS and HTML support of one HTML file in the given email clients, from the caniemail data
// bundled with doiuse-email. Used by `newsletter issue check` (newsletter/checks.py).
//
//   node check.mjs FILE|- CLIENT...      e.g.  node check.mjs issue.html 'gmail.*' outlook.windows
//
// Prints one JSON object: {"tool", "clients", "features": [{feature, client, support, count,
// notes}], "other": [...]}. support is "none" (not supported) or "partial"; count is how many
// times the construct was met; notes are caniemail's notes for that client. doiuse-email
// reports plain sentences; they are parsed back here (its version is pinned in
// package-lock.json), and any sentence that does not parse is kept whole in "other".
import { readFileSync } from 'node:fs';
import process from 'node:process';
import { doIUseEmail } from 'doiuse-email';

const [file, ...clients] = process.argv.slice(2);
if (!file || clients.length === 0) {
	process.stderr.write('usage: node check.mjs FILE|- CLIENT...\n');
	process.exit(2);
}
const html = readFileSync(file === '-' ? 0 : file, 'utf8');
const result = doIUseEmail(html, { emailClients: clients });

const features = new Map();
const other = [];
function entry(feature, client) {
	const key = `${feature}\u0000${client}`;
	if (!features.has(key)) {
		features.set(key, { feature, client, support: null, count: 0, notes: [] });
	}
	return features.get(key);
}

const NONE = /^`(.+)` is not supported by `([^`]+)`$/s;
const PARTIAL = /^`(.+)` is only partially supported by `([^`]+)`$/s;
const NOTE = /^Note about `(.+)` support for `([^`]+)`: (.*)$/s;
for (const [sentences, support] of [[result.errors ?? [], 'none'], [result.warnings ?? [], 'partial']]) {
	for (const sentence of sentences) {
		const m = sentence.match(support === 'none' ? NONE : PARTIAL);
		if (m === null) {
			other.push(sentence);
			continue;
		}
		const e = entry(m[1], m[2]);
		e.support = support;
		e.count += 1;
	}
}
for (const sentence of result.notes ?? []) {
	const m = sentence.match(NOTE);
	if (m === null) {
		other.push(sentence);
		continue;
	}
	const e = entry(m[1], m[2]);
	if (!e.notes.includes(m[3])) e.notes.push(m[3]);
}

// The package's exports do not include package.json; read it beside this script.
const version = JSON.parse(readFileSync(
	new URL('node_modules/doiuse-email/package.json', import.meta.url), 'utf8')).version;
process.stdout.write(JSON.stringify({
	tool: `doiuse-email ${version}`,
	clients,
	// Notes of features that are supported (no error or warning) are caveats only.
	features: [...features.values()].filter((e) => e.support !== null),
	other,
}) + '\n');
