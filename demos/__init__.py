"""vidaccel's demos. `demos.app` is the Gradio app that `vidaccel demo` starts."""
