"""Export: slice the model for real and save or download it, with a report and the figures."""
import streamlit as st

from kcm_app import ui
from kcm_app.views import export

ui.entry_guard(__file__)
st.title("Export")
ws = ui.require_workspace()
left, mid, right = st.columns([3, 2, 1])
out_dir = left.text_input("Output folder", f"out/kcm-{st.session_state['method']}-{st.session_state['budget']:.2f}",
                          key="export_dir", help="Created on this machine; refused if it exists unless "
                                                 "'overwrite' is ticked")
formats = mid.multiselect("Formats", ["hf", "onnx"], ["hf"], key="export_formats",
                          help="hf: safetensors + config (stock from_pretrained when widths are uniform); "
                               "onnx: loads anywhere")
overwrite = right.checkbox("Overwrite", key="export_overwrite", help="Replace an existing folder")
go = st.button("Prune and save", type="primary", key="export_go",
               help="Slices the model physically, saves it, reloads it to check, and offers a zip")
export.page(ws, out_dir, formats, overwrite, go)
