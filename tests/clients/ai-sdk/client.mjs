// Drives baton through the `ai` package's own DefaultChatTransport and readUIMessageStream.
// One JSON argument: {api, token, chatId, messageId, text, cutAfter?}. Prints one JSON line
// (its last line); before it, one line {"approval": <tool-approval-request chunk>} per approval
// request as it comes, for the test to answer through baton's approvals route.
//   cutAfter absent: send, read the whole answer.
//   cutAfter N: send, drop the connection after N text deltas, then reconnect (GET {api}/{chatId}/stream).
//   text absent: only reconnect.
import { DefaultChatTransport, readUIMessageStream } from "ai";

const args = JSON.parse(process.argv[2]);
const transport = new DefaultChatTransport({
  api: args.api,
  headers: { Authorization: "Bearer " + args.token },
});

function recording(stream, types, stopAfter, abort) {
  let deltas = 0;
  return stream.pipeThrough(new TransformStream({
    transform(chunk, controller) {
      types.push(chunk.type);
      if (chunk.type === "tool-approval-request") console.log(JSON.stringify({ approval: chunk }));
      controller.enqueue(chunk);
      if (chunk.type === "text-delta" && stopAfter !== undefined && ++deltas >= stopAfter) {
        controller.terminate();
        abort.abort();
      }
    },
  }));
}

async function read(stream) {
  let last;
  const errors = [];
  const toolStates = [];
  for await (const message of readUIMessageStream({ stream, onError: (e) => errors.push(String(e.message || e)) })) {
    last = message;
    for (const p of message.parts) {
      const seen = p.type === "dynamic-tool" ? `${p.toolCallId}:${p.state}` : null;
      if (seen && toolStates[toolStates.length - 1] !== seen) toolStates.push(seen);
    }
  }
  const text = last ? last.parts.filter((p) => p.type === "text").map((p) => p.text).join("") : null;
  const tools = last ? last.parts.filter((p) => p.type === "dynamic-tool") : [];
  return { id: last ? last.id : null, text, errors, tools, toolStates, partTypes: last ? last.parts.map((p) => p.type) : [] };
}

const out = {};
try {
  if (args.text !== undefined) {
    const abort = new AbortController();
    const stream = await transport.sendMessages({
      chatId: args.chatId,
      messages: [{ id: args.messageId, role: "user", parts: [{ type: "text", text: args.text }] }],
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: abort.signal,
    });
    const types = [];
    out.sent = await read(recording(stream, types, args.cutAfter, abort));
    out.sent.types = types;
  }
  if (args.cutAfter !== undefined || args.text === undefined) {
    const stream = await transport.reconnectToStream({ chatId: args.chatId });
    if (stream === null) {
      out.resumed = null;
    } else {
      const types = [];
      out.resumed = await read(recording(stream, types));
      out.resumed.types = types;
    }
  }
} catch (e) {
  out.error = { name: e.name, message: e.message, status: e.statusCode ?? null };
}
console.log(JSON.stringify(out));
