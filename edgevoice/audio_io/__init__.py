"""The local voice loop: microphone → wake word → endpointing → ASR → actions → TTS → speaker.

Standalone (:mod:`.loop`, :mod:`.actions`) or as a Home Assistant Assist
satellite over the ESPHome native API (:mod:`.esphome`). :mod:`.devices`
opens PortAudio and ``file:`` devices, :mod:`.player` is the one ordered
playback queue of the local speaker, :mod:`.server` the face the daemon runs.
Importing this package imports nothing heavy.
"""
