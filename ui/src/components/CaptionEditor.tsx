// One dataset item: its thumbnail, its caption (saved with the button or Ctrl+Enter) and delete.
import { useState } from "react";
import { api, datasetItemUrl } from "../lib/api";
import { useAction } from "../lib/hooks";
import { bytes } from "../lib/format";
import type { DatasetItem } from "../lib/types";
import { ConfirmButton } from "./common";

export function CaptionEditor({ dataset, item, onDeleted }: { dataset: string; item: DatasetItem; onDeleted: () => void }) {
  const [text, setText] = useState(item.caption ?? "");
  const [saved, setSaved] = useState(item.caption ?? "");
  const save = useAction();
  const remove = useAction();
  const dirty = text !== saved;

  const onSave = async () => {
    const r = await save.run(() => api.put<{ caption: string }>(
      `/api/datasets/${encodeURIComponent(dataset)}/items/${encodeURIComponent(item.name)}/caption`, { caption: text }));
    if (r) setSaved(r.caption);
  };

  return (
    <div className="item-card" data-item={item.name}>
      <a href={datasetItemUrl(dataset, item.name, "file")} target="_blank" rel="noreferrer" className="thumb">
        <img src={datasetItemUrl(dataset, item.name, "thumbnail")} alt={item.name} loading="lazy" />
        {item.kind === "video" ? <span className="thumb-tag">video</span> : null}
      </a>
      <div className="item-name" title={item.name}>{item.name} <span className="muted small">{bytes(item.size)}</span></div>
      <textarea value={text} rows={3} placeholder="caption (empty: the dataset's default caption)" data-testid="caption"
        onChange={(e) => setText(e.target.value)}
        onKeyDown={(e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) void onSave(); }} />
      <div className="actions">
        <button type="button" className="btn btn-small btn-primary" disabled={!dirty || save.busy} data-testid="save-caption" onClick={() => void onSave()}>
          Save
        </button>
        <span className="small muted" data-testid="caption-state">{save.busy ? "saving…" : dirty ? "edited" : saved ? "saved" : "no caption"}</span>
        <ConfirmButton className="btn btn-small btn-danger" label="Delete" question="Delete?" disabled={remove.busy}
          onConfirm={() => void remove.run(() => api.del(`/api/datasets/${encodeURIComponent(dataset)}/items/${encodeURIComponent(item.name)}`)).then(onDeleted)} />
      </div>
      {save.error ? <div className="field-problem">{save.error}</div> : null}
      {remove.error ? <div className="field-problem">{remove.error}</div> : null}
    </div>
  );
}
