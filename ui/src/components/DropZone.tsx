// Drop images and videos here, or pick them with the file dialog.
import { useRef, useState, type DragEvent } from "react";

export const MEDIA_ACCEPT = ".jpg,.jpeg,.png,.webp,.bmp,.mp4,.mov,.m4v,.webm,.mkv,.gif,image/*,video/*";
const MEDIA_RE = /\.(jpe?g|png|webp|bmp|mp4|mov|m4v|webm|mkv|gif)$/i;

export function DropZone({ onFiles, disabled, hint }: { onFiles: (files: File[]) => void; disabled?: boolean; hint?: string }) {
  const input = useRef<HTMLInputElement>(null);
  const [over, setOver] = useState(false);
  const [skipped, setSkipped] = useState<string[]>([]);

  const take = (list: FileList | null) => {
    const files = Array.from(list ?? []);
    const media = files.filter((f) => MEDIA_RE.test(f.name));
    setSkipped(files.filter((f) => !MEDIA_RE.test(f.name)).map((f) => f.name));
    if (media.length) onFiles(media);
  };
  const onDrop = (event: DragEvent<HTMLDivElement>) => {
    event.preventDefault();
    setOver(false);
    if (!disabled) take(event.dataTransfer.files);
  };

  return (
    <div className={`dropzone ${over ? "dropzone-over" : ""} ${disabled ? "dropzone-off" : ""}`} data-testid="dropzone"
      onDragOver={(e) => { e.preventDefault(); setOver(true); }} onDragLeave={() => setOver(false)} onDrop={onDrop}
      onClick={() => !disabled && input.current?.click()} role="button" tabIndex={0}
      onKeyDown={(e) => { if (e.key === "Enter" || e.key === " ") input.current?.click(); }}>
      <input ref={input} type="file" multiple accept={MEDIA_ACCEPT} hidden data-testid="file-input"
        onChange={(e) => { take(e.target.files); e.target.value = ""; }} />
      <strong>Drop images or videos here</strong> or click to choose files
      <div className="muted small">{hint ?? "jpg, png, webp, bmp; mp4, mov, webm, mkv, gif. A .txt caption can be edited after upload."}</div>
      {skipped.length ? <div className="field-problem">Skipped (not an image or video): {skipped.join(", ")}</div> : null}
    </div>
  );
}
