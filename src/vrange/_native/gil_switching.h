/* Keeping other Python threads out while a regenerator runs at an unsafe point (gil_switching.c). */
#ifndef VRANGE_GIL_SWITCHING_H
#define VRANGE_GIL_SWITCHING_H

/* cffi: begin (exported to Python; build.py reads these blocks) */
int vr_gil_switches_can_be_held(void);
/* cffi: end */

/* No forced GIL switch between hold and release (nested holds count; called with the GIL held). */
void vr_hold_gil_switches(void);
void vr_release_gil_switches(void);

#endif /* VRANGE_GIL_SWITCHING_H */
